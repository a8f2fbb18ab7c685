"""A plain install (no extras) is what the package imports at run time; optional packages are imported where a
feature needs them and name their extra; CI runs the README's install lines as written."""
from __future__ import annotations

import ast
import importlib.util
import logging
import re
import sys
import tomllib
from pathlib import Path

import pytest

from dopsd_fast import _extras
from dopsd_fast.cli import main
from dopsd_fast.train import telemetry
from dopsd_fast.train.metrics import StepLog, open_sinks

ROOT = Path(__file__).resolve().parents[1]

# import name -> distribution in pyproject's `dependencies`
RUNTIME = {"torch": "torch", "numpy": "numpy", "safetensors": "safetensors", "yaml": "pyyaml", "PIL": "pillow",
           "tqdm": "tqdm", "transformers": "transformers", "huggingface_hub": "huggingface-hub"}
# import name -> how it gets installed; imported only inside the functions of the feature that needs it
OPTIONAL = {"deepspeed": "[deepspeed]", "diffusers": "[diffusers]", "pynvml": "[telemetry] (nvidia-ml-py)",
            "triton": "CUDA torch brings it; the README pins it on CPU", "torchao": "[lowbit]", "wandb": "[wandb]"}


def _sources() -> list[Path]:
    # rglob does not follow the dopsd_fast/_kernels symlink, so kernels/ is read once
    return sorted((ROOT / "dopsd_fast").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))


def _imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(module, imported at module level) of every absolute import, and of every ``require("module", ...)``."""
    top = {id(node) for node in tree.body}
    top |= {id(n) for node in tree.body if isinstance(node, (ast.Try, ast.If)) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in top))
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and node.args
              and isinstance(node.args[0], ast.Constant)):
            found.append((node.args[0].value, False))
    return found


def test_runtime_dependencies_are_what_the_package_imports():
    third_party: dict[str, list[str]] = {}
    for path in _sources():
        for module, _ in _imports(ast.parse(path.read_text(), str(path))):
            name = module.partition(".")[0]
            if name not in sys.stdlib_module_names and name not in ("__future__", "dopsd_fast"):
                third_party.setdefault(name, []).append(str(path.relative_to(ROOT)))
    unknown = {k: v for k, v in third_party.items() if k not in RUNTIME and k not in OPTIONAL}
    assert not unknown, f"imported but neither a dependency nor optional: {unknown}"
    assert set(RUNTIME) <= set(third_party), f"listed but never imported: {set(RUNTIME) - set(third_party)}"

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() for req in project["dependencies"]}
    assert names == set(RUNTIME.values()), "pyproject's dependencies are not exactly the run-time imports"
    extras = project["optional-dependencies"]
    for extra, package in (("deepspeed", "deepspeed"), ("diffusers", "diffusers"), ("telemetry", "nvidia-ml-py"),
                           ("telemetry", "tensorboard"), ("lowbit", "torchao"), ("wandb", "wandb")):
        assert any(req.startswith(package) for req in extras[extra]), (extra, package)


def test_optional_packages_are_imported_only_inside_functions():
    """`import dopsd_fast` and the CLI work on a plain install: no module of the package imports an optional
    package, or the Triton kernels (which import triton), when it is loaded."""
    at_load = [f"{path.relative_to(ROOT)}: {module}" for path in sorted((ROOT / "dopsd_fast").rglob("*.py"))
               for module, module_level in _imports(ast.parse(path.read_text()))
               if module_level and (module.partition(".")[0] in OPTIONAL or module.startswith("dopsd_fast._kernels"))]
    assert not at_load


def test_a_missing_extra_is_named():
    with pytest.raises(_extras.MissingExtra, match=r'feature X needs the `no_such_pkg_dopsd` package, which is not '
                                                   r'installed: pip install "dopsd_fast\[extra\]"'):
        _extras.require("no_such_pkg_dopsd.sub", "extra", "feature X")
    with pytest.raises(ModuleNotFoundError) as err:      # an installed package's missing part is its own error
        _extras.require("json.no_such_submodule", "extra", "feature X")
    assert not isinstance(err.value, _extras.MissingExtra)


def test_deepspeed_stage_without_deepspeed_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepspeed", None)      # `import deepspeed` -> ModuleNotFoundError
    code = main(["train", "tiny-cpu", "--set", "deepspeed.stage=2", "--set", f"train.output_dir={tmp_path}",
                 "--no-progress", "--no-samples"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == ('dopsd: error: deepspeed.stage=2 needs the `deepspeed` package, which is not installed: '
                           'pip install "dopsd_fast[deepspeed]" (from a checkout: pip install -e ".[deepspeed]")')


def test_vae_without_diffusers_names_the_extra(tmp_path, monkeypatch):
    from dopsd_fast.models.loading import load_vae
    from dopsd_fast.models.loading_flux2 import load_flux2_vae

    monkeypatch.setitem(sys.modules, "diffusers", None)
    for load in (load_vae, load_flux2_vae):
        with pytest.raises(_extras.MissingExtra, match=r'pip install "dopsd_fast\[diffusers\]"'):
            load(tmp_path)


def test_report_to_wandb_without_wandb_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    code = main(["train", "tiny-cpu", "--set", "train.report_to=[wandb,jsonl]", "--set", f"train.output_dir={tmp_path}",
                 "--no-progress", "--no-samples"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        'dopsd: error: train.report_to: [wandb] needs the `wandb` package, which is not installed: '
        'pip install "dopsd_fast[wandb]" (from a checkout: pip install -e ".[wandb]")')
    assert not any(tmp_path.iterdir())          # refused before the run wrote anything


def test_report_to_tensorboard_without_tensorboard_warns_once_and_logs_jsonl(tmp_path, monkeypatch, caplog):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    telemetry._tensorboard_installed.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            logs = [StepLog(tmp_path / f"m{i}.jsonl", K=4, enabled=False,
                            sinks=open_sinks(["tensorboard", "jsonl"], tmp_path / f"run{i}", 1, {})) for i in range(2)]
    finally:
        telemetry._tensorboard_installed.cache_clear()
    assert all(log.sinks == [] for log in logs) and not list(tmp_path.glob("run*"))
    warnings = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len(warnings) == 1 and 'pip install "dopsd_fast[telemetry]"' in warnings[0]
    assert "\n" not in warnings[0]
    logs[0].log({"step": 1, "loss": 0.5}, show=False)
    assert (tmp_path / "m0.jsonl").read_text().strip() == '{"step": 1, "loss": 0.5}'


def _readme_command(label: str) -> str:
    """The one-line command of the ```bash block that follows "(a)" / "(b)" in the README's quick start."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme[readme.index(f"\n{label} "):], re.S).group(1).strip()
    assert "\n" not in block, f"README {label}: expected a one-line command, got {block!r}"
    return block


def test_ci_runs_the_readme_install_commands_as_written():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    tests, plain = _readme_command("(b)"), _readme_command("(a)")
    assert "[dev]" in tests and "[dev]" not in plain and plain.endswith("dopsd demo")
    assert tests in lines, ".ci/run must run README (b) verbatim"
    assert plain in lines, ".ci/run must run README (a) verbatim"
    # (a) creates ./.venv: it runs in the fresh copy, after the tests' .venv has done its work
    assert lines.index(tests) < lines.index('cd "$plain"') < lines.index(plain)
    after = lines[lines.index(plain) + 1:]
    assert any(line.startswith(".venv/bin/dopsd train tiny-cpu ") for line in after)

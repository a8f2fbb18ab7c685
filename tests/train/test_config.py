"""The typed config: presets, `--set` overrides, and errors that name the key before anything is built."""
from __future__ import annotations

from pathlib import Path

import pytest

import dopsd_fast.train.build as build
from dopsd_fast.cli import main
from dopsd_fast.models.z_image import ZImageTransformer
from dopsd_fast.train.config import Config, ConfigError, apply_overrides, load_config, preset_path

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


# ---------------------------------------------------------------- presets

def test_tiny_cpu_preset_is_shipped():
    assert "tiny-cpu" in [p.stem for p in PRESETS]


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    # ... and the same preset by name resolves to that file and gives the same config.
    assert preset_path(path.stem).resolve() == path.resolve()
    assert load_config(path.stem).to_dict() == cfg.to_dict()


def test_tiny_cpu_values():
    cfg = load_config("tiny-cpu")
    assert cfg.model.arch["dim"] == 64
    assert cfg.method.sigmas == [1.0, 0.9, 0.75, 0.5]
    assert cfg.method.ema_decay == 0.99
    assert cfg.optim.lr == pytest.approx(2e-3)
    assert cfg.optim.betas == [0.9, 0.999]
    assert cfg.train.resume == "auto"


def test_no_config_gives_defaults():
    assert load_config(None).to_dict() == Config().to_dict()


def test_preset_path_tiny_cpu():
    p = preset_path("tiny-cpu")
    assert p.is_file() and p.name == "tiny-cpu.yaml"
    assert p.resolve() == (ROOT / "configs" / "tiny-cpu.yaml").resolve()
    assert preset_path("tiny-cpu.yaml").resolve() == p.resolve()


def test_preset_path_unknown_name_lists_presets():
    with pytest.raises(ConfigError) as e:
        preset_path("tiny-gpu")
    msg = str(e.value)
    assert "tiny-gpu" in msg and "not found" in msg
    for p in PRESETS:
        assert p.stem in msg


def test_preset_path_missing_folder_does_not_fall_back_to_a_preset(tmp_path):
    # A typo in the folder of an explicit path must not silently train the shipped preset of the same name.
    with pytest.raises(ConfigError, match="not found"):
        preset_path(str(tmp_path / "no-such-dir" / "tiny-cpu.yaml"))


def test_explicit_yaml_path(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("train: {steps: 7}\nmethod: {sigmas: [1.0, 0.5]}\n")
    cfg = load_config(str(f))
    assert cfg.train.steps == 7 and cfg.method.sigmas == [1.0, 0.5]
    assert cfg.optim.lr == Config().optim.lr            # unspecified sections keep their defaults


def test_yaml_syntax_error_names_the_place_not_the_encoding(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steps: 5\n   lr: x\n")          # ASCII; line 3 is indented under a scalar
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    msg = str(e.value)
    assert str(f) in msg and "not valid YAML" in msg and "line 3, column 6" in msg and "UTF-8" not in msg


def test_non_utf8_file_says_so(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("train: {output_dir: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text .*save it as UTF-8"):
        load_config(str(f))


def test_top_level_must_be_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(f))


# ---------------------------------------------------------------- unknown keys

def test_unknown_top_level_key():
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", ["modle.dim=1"])
    msg = str(e.value)
    assert "'modle'" in msg and "did you mean 'model'" in msg


def test_unknown_nested_key():
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", ["method.lsos=x0"])
    msg = str(e.value)
    assert "'method.lsos'" in msg and "did you mean 'method.loss'" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("optim: {lr: 0.1}\ntrain: {stesp: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert "'train.stesp'" in str(e.value) and "did you mean 'train.steps'" in str(e.value)


def test_retired_key_says_what_became_of_it(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("method: {packed_forward: false}\n")
    with pytest.raises(ConfigError, match=r"'method.packed_forward' was removed: teacher and student always run as "
                                          r"two forwards .*; delete the key"):
        load_config(str(f))


def test_train_tensorboard_names_report_to():
    with pytest.raises(ConfigError, match=r"'train.tensorboard' was replaced by train.report_to, a list of tensorboard "
                                          r"\| wandb \| jsonl \(tensorboard: true is report_to: \[tensorboard, jsonl\]"):
        load_config("tiny-cpu", ["train.tensorboard=false"])
    assert load_config("tiny-cpu").train.report_to == ["tensorboard", "jsonl"]
    with pytest.raises(ConfigError, match=r"train.report_to\[1\]: 'mlflow' is not one of 'tensorboard', 'wandb', 'jsonl'"):
        load_config("tiny-cpu", ["train.report_to=[jsonl,mlflow]"])
    with pytest.raises(ConfigError, match=r"train.report_to: lists a sink twice"):
        load_config("tiny-cpu", ["train.report_to=[jsonl,jsonl]"])


def test_unknown_key_without_near_match_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", ["train.zzzzzz=1"])
    msg = str(e.value)
    assert "train.zzzzzz" in msg and "did you mean" not in msg and "steps" in msg


# ---------------------------------------------------------------- types and values

@pytest.mark.parametrize("override, key, fragment", [
    ("train.steps=abc", "train.steps", "integer"),
    ("train.steps=2.5", "train.steps", "integer"),
    ("method.per_step_backward=3", "method.per_step_backward", "true/false"),
    ("optim.lr=[1]", "optim.lr", "number"),
    ("optim.lr=fast", "optim.lr", "number"),
    ("optim.betas=0.9", "optim.betas", "list"),
    ("method.sigmas=[1.0, x]", "method.sigmas[1]", "number"),
    ("train.output_dir=5", "train.output_dir", "string"),
    ("train.resume=[a]", "train.resume", "string"),
    ("model.arch=3", "model.arch", "mapping"),
    ("method=3", "method", "mapping"),
    ("method.loss=kl", "method.loss", "'x0', 'velocity'"),
    ("model.dtype=fp16", "model.dtype", "'fp32', 'bf16'"),
    ("optim.lr=inf", "optim.lr", "finite"),
    ("optim.lr=.nan", "optim.lr", "finite"),
])
def test_wrong_types_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", [override])
    msg = str(e.value)
    assert msg.startswith(key + ":"), msg
    assert fragment in msg


@pytest.mark.parametrize("override, key", [
    ("method.sigmas=[1.0, 0.5, 0.5]", "method.sigmas"),        # not strictly decreasing
    ("method.sigmas=[0.5, 0.9]", "method.sigmas"),             # increasing
    ("method.sigmas=[1.5, 0.5]", "method.sigmas"),             # sigma > 1
    ("method.sigmas=[1.0, 0.0]", "method.sigmas"),             # sigma_K = 0 is implied, not listed
    ("method.sigmas=[]", "method.sigmas"),
    ("method.ema_decay=1.0", "method.ema_decay"),
    ("method.ema_decay=-0.1", "method.ema_decay"),
    ("data.image_size=40", "data.image_size"),
    ("data.image_size=0", "data.image_size"),
    ("optim.lr=0", "optim.lr"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.steps=0", "train.steps"),
    ("train.keep_last=0", "train.keep_last"),
    ("adapter.targets=[]", "adapter.targets"),
    ("sample.steps=0", "sample.steps"),
    ("context.max_text_tokens=0", "context.max_text_tokens"),
    ("data.kind=folder", "data.path"),
])
def test_semantic_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", [override])
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_full_mode_needs_no_targets():
    cfg = load_config("tiny-cpu", ["adapter.mode=full", "adapter.targets=[]"])
    assert cfg.adapter.mode == "full"


def test_boundary_values_are_accepted():
    cfg = load_config("tiny-cpu", ["method.sigmas=[1.0]", "method.ema_decay=0.0", "data.image_size=16",
                                   "optim.grad_clip=0"])
    assert cfg.method.sigmas == [1.0] and cfg.method.ema_decay == 0.0 and cfg.data.image_size == 16


# ---------------------------------------------------------------- model.arch: checked by resolve_plan, before any build

@pytest.fixture
def no_model_builds(monkeypatch):
    """Make building a model (also on the meta device) an error, so a test proves nothing was built."""
    class Built(AssertionError):
        pass

    def boom(*args, **kwargs):
        raise Built("a model was built")

    monkeypatch.setattr(build, "build_model", boom)
    monkeypatch.setattr(ZImageTransformer, "__init__", boom)
    return Built


def test_no_model_builds_fixture_detects_a_build(no_model_builds):
    # The guard is real: resolving a valid plan builds the (meta) model and trips it.
    with pytest.raises(no_model_builds):
        build.resolve_plan(load_config("tiny-cpu"))


@pytest.mark.parametrize("override, key, fragment", [
    ("model.arch.dimm=64", "model.arch", "dimm"),
    ("model.arch.axes_dims=[8, 8, 8]", "model.arch.axes_dims", "dim/n_heads = 32"),
    ("model.arch.in_channels=4", "model.arch.in_channels", "must be 3"),
    ("model.arch.n_heads=0", "model.arch.n_heads", "positive integer"),
    ("model.arch.n_heads=3", "model.arch.n_heads", "divide dim"),
    ("model.arch.dim=abc", "model.arch.dim", "positive integer"),
    ("model.arch.rope_theta=-1", "model.arch.rope_theta", "positive number"),
    ("model.arch.axes_dims=[8, x, 12]", "model.arch.axes_dims", "list of positive integers"),
])
def test_arch_errors_before_any_model_is_built(no_model_builds, override, key, fragment):
    cfg = load_config("tiny-cpu", [override])      # model.arch is a free mapping: accepted here ...
    with pytest.raises(ConfigError) as e:           # ... and rejected when the plan is resolved
        build.resolve_plan(cfg)
    msg = str(e.value)
    assert msg.startswith(key), msg
    assert fragment in msg


@pytest.mark.parametrize("override, key", [
    ("model.arch.dimm=64", "model.arch"),
    ("model.arch.in_channels=4", "model.arch.in_channels"),
    ("method.lsos=x0", "method.lsos"),
    ("method.sigmas=[0.5, 0.9]", "method.sigmas"),
    ("data.image_size=40", "data.image_size"),
])
def test_cli_reports_config_errors_before_any_model_is_built(no_model_builds, capsys, tmp_path, override, key):
    out_dir = tmp_path / "run"
    for extra in ([], ["--dry-run"]):
        rc = main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={out_dir}",
                   "--set", override, *extra])
        err = capsys.readouterr().err
        assert rc == 2
        assert "dopsd: error:" in err and key in err
    assert not out_dir.exists()


def test_arch_error_reported_even_with_valid_rest():
    # 64 / 2 heads = 32 = 8 + 12 + 12 in the preset; changing the head count breaks the sum.
    cfg = load_config("tiny-cpu", ["model.arch.n_heads=4", "model.arch.n_kv_heads=4"])
    with pytest.raises(ConfigError, match=r"model\.arch\.axes_dims: must sum to dim/n_heads = 16"):
        build.resolve_plan(cfg)


# ---------------------------------------------------------------- --set parsing

def test_set_parses_yaml_values():
    cfg = load_config("tiny-cpu", [
        "train.steps=5",
        "optim.lr=0.5",
        "optim.betas=[0.8, 0.99]",
        "method.sigmas=[1.0, 0.6, 0.3]",
        "train.resume=null",
        "model.arch.dim=128",
        "sample.prompts=[a red circle, 'x: y']",
        "method.per_step_backward=false",
    ])
    assert cfg.train.steps == 5 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.99]
    assert cfg.method.sigmas == [1.0, 0.6, 0.3]
    assert cfg.train.resume is None
    assert cfg.model.arch["dim"] == 128 and cfg.model.arch["n_layers"] == 2    # merged into the preset's arch
    assert cfg.sample.prompts == ["a red circle", "x: y"]
    assert cfg.method.per_step_backward is False


def test_set_int_for_float_key_becomes_float():
    cfg = load_config("tiny-cpu", ["optim.lr=1", "method.sigmas=[1, 0.5]"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert all(isinstance(s, float) for s in cfg.method.sigmas)


def test_set_exponent_float_without_dot():
    # YAML 1.1 reads `1e-4` as a string; float keys still accept it.
    assert load_config("tiny-cpu", ["optim.lr=1e-4"]).optim.lr == pytest.approx(1e-4)


def test_set_later_override_wins_and_value_may_contain_equals():
    cfg = load_config("tiny-cpu", ["train.steps=5", "train.steps=6", "train.output_dir=out/a=b"])
    assert cfg.train.steps == 6 and cfg.train.output_dir == "out/a=b"


def test_apply_overrides_builds_nested_sections():
    data = apply_overrides({"train": {"steps": 1}}, ["train.steps=3", "a.b.c=[1, 2]", "x=null", " y = 4"])
    assert data == {"train": {"steps": 3}, "a": {"b": {"c": [1, 2]}}, "x": None, "y": 4}


def test_set_missing_equals():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("tiny-cpu", ["train.steps"])


def test_set_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match="'steps' is not a section"):
        load_config("tiny-cpu", ["train.steps.x=1"])


def test_set_malformed_yaml_value_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", ["method.sigmas=[1.0, 0.5"])
    assert "method.sigmas" in str(e.value)


def test_cli_malformed_set_value_exit_2(capsys, tmp_path):
    rc = main(["train", "--dry-run", "--set", f"train.output_dir={tmp_path / 'run'}", "--set", "method.sigmas=[1.0,"])
    err = capsys.readouterr().err
    assert rc == 2 and "dopsd: error:" in err and "method.sigmas" in err and "Traceback" not in err


def test_set_into_a_section_left_empty_in_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sample:\ntrain: {steps: 3}\n")
    cfg = load_config(str(path), ["sample.steps=2"])
    assert cfg.sample.steps == 2 and cfg.train.steps == 3

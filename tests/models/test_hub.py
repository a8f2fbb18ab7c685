"""Weights by Hugging Face id (models/hub.py, train/build.py resolve_weights), fully offline: each test writes a Hub
cache in huggingface_hub's own layout (models--owner--name/{blobs,refs,snapshots/<commit>}, snapshot files linked to
blobs) and points huggingface_hub at it with HF_HUB_OFFLINE=1."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dopsd_fast.cli import main
from dopsd_fast.models.hub import parse_hub_id
from dopsd_fast.models.loading import load_zimage_transformer
from dopsd_fast.train.build import resolve_weights
from dopsd_fast.train.config import ConfigError, load_config

huggingface_hub = pytest.importorskip("huggingface_hub")
diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel  # noqa: E402

PIXEL_TINY = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=3, dim=64, n_layers=1, n_refiner_layers=1,
                  n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def write_snapshot(cache, repo_id, commit, src, refs=()):
    """Files under ``src`` as snapshot ``commit`` of ``repo_id`` in the Hub cache ``cache``; ``refs`` point at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def tiny_pipeline(folder, seed):
    """A pipeline repo's tree holding only a tiny pixel-space Z-Image transformer/ (what tiny-cpu trains)."""
    torch.manual_seed(seed)
    ZImageTransformer2DModel(**PIXEL_TINY).save_pretrained(folder / "transformer")
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hub cache that huggingface_hub reads, offline (its constants are read at import: patch them too)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def two_snapshots(hub, tmp_path):
    """owner/tiny: commit A (main) and commit B (tag v2), random weights of seeds 0 and 1."""
    a = write_snapshot(hub, "owner/tiny", COMMIT_A, tiny_pipeline(tmp_path / "src-a", 0), refs=["main"])
    b = write_snapshot(hub, "owner/tiny", COMMIT_B, tiny_pipeline(tmp_path / "src-b", 1), refs=["v2"])
    return a, b


def _train(out, pretrained, preset="tiny-cpu"):
    return main(["train", preset, "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(out))}",
                 "--set", "train.steps=1", "--set", "train.resume=null", "--set", "model.arch={}",
                 "--set", f"model.pretrained={json.dumps(str(pretrained))}"])


def _same_student(run, other):
    step = "checkpoints/step-000001/student.safetensors"
    got, want = load_file(str(run / step)), load_file(str(other / step))
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_cache_is_in_huggingface_hubs_layout(two_snapshots, hub):
    info = huggingface_hub.scan_cache_dir(hub)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "owner/tiny" and repo.repo_type == "model"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {COMMIT_A: {"main"}, COMMIT_B: {"v2"}}


@pytest.mark.parametrize("spec, parsed", [
    ("Tongyi-MAI/Z-Image-Turbo", ("Tongyi-MAI/Z-Image-Turbo", None)),
    ("black-forest-labs/FLUX.2-klein-4B@main", ("black-forest-labs/FLUX.2-klein-4B", "main")),
    (f"Qwen/Qwen3-VL-4B-Instruct@{COMMIT_A}", ("Qwen/Qwen3-VL-4B-Instruct", COMMIT_A)),
    ("models/Z-Image-Turbo/transformer", None),        # the presets' relative local paths: never an id
    ("/abs/transformer", None), ("./a/b", None), ("~/a/b", None), ("a/..", None), ("name-only", None),
])
def test_what_is_a_hub_id(spec, parsed):
    assert parse_hub_id(spec) == parsed


def test_an_existing_local_folder_is_never_an_id(tmp_path, monkeypatch):
    (tmp_path / "owner" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("owner/tiny") is None


def test_hub_id_trains_exactly_like_the_local_folder(two_snapshots, tmp_path):
    hub_run, local_run = tmp_path / "hub-run", tmp_path / "local-run"
    assert _train(hub_run, "owner/tiny") == 0
    assert _train(local_run, tmp_path / "src-a" / "transformer") == 0
    assert _same_student(hub_run, local_run)
    losses = [[json.loads(row)["loss"] for row in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (hub_run, local_run)]
    assert losses[0] == losses[1]
    assert "pretrained: owner/tiny" in (hub_run / "config.yaml").read_text()     # the run keeps the id as written
    # `dopsd sample` rebuilds the run from its config.yaml: the id resolves again, offline, to the same snapshot
    assert main(["sample", str(hub_run), "--out", str(tmp_path / "s.png"), "--steps", "1", "--prompt", "a dot"]) == 0
    assert (tmp_path / "s.png").is_file()


def test_a_klein_id_trains_exactly_like_the_local_folder(hub, tmp_path):
    from diffusers import Flux2Transformer2DModel

    arch = load_config("tiny-klein-cpu").model.arch
    torch.manual_seed(0)
    Flux2Transformer2DModel(**arch, guidance_embeds=False).save_pretrained(tmp_path / "src" / "transformer")
    write_snapshot(hub, "black-forest-labs/FLUX.2-klein-4B", COMMIT_A, tmp_path / "src", refs=["main"])
    assert _train(tmp_path / "hub", f"black-forest-labs/FLUX.2-klein-4B@{COMMIT_A}", "tiny-klein-cpu") == 0
    assert _train(tmp_path / "local", tmp_path / "src" / "transformer", "tiny-klein-cpu") == 0
    assert _same_student(tmp_path / "hub", tmp_path / "local")


@pytest.mark.parametrize("revision, commit", [("", COMMIT_A), ("@main", COMMIT_A), ("@v2", COMMIT_B),
                                              (f"@{COMMIT_B}", COMMIT_B), (f"@{COMMIT_A}", COMMIT_A)])
def test_revision_pins_the_snapshot(two_snapshots, tmp_path, revision, commit):
    cfg = load_config("tiny-cpu", ["model.arch={}", f"model.pretrained=owner/tiny{revision}"])
    parts = resolve_weights(cfg)
    assert parts.model.pretrained == str(two_snapshots[1 if commit == COMMIT_B else 0] / "transformer")
    assert cfg.model.pretrained == f"owner/tiny{revision}"          # the config itself is left as written
    src = tmp_path / ("src-b" if commit == COMMIT_B else "src-a") / "transformer"
    got, want = load_zimage_transformer(parts.model.pretrained).state_dict(), load_zimage_transformer(src).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("spec, fragments", [
    ("owner/missing", ["model.pretrained: owner/missing: no local path of that name, and owner/missing is not",
                       "HF_HUB_OFFLINE=1 is set: run once online to download it, or set the key to a local folder"]),
    ("owner/tiny@nope", ["model.pretrained: owner/tiny@nope:", "owner/tiny at revision 'nope' is not",
                         "HF_HUB_OFFLINE=1"]),
])
def test_an_id_missing_offline_exits_2_before_anything_is_written(two_snapshots, hub, tmp_path, capsys, spec,
                                                                   fragments):
    assert _train(tmp_path / "run", spec) == 2
    err = capsys.readouterr().err
    assert err.startswith("dopsd: error:") and "Traceback" not in err
    assert all(f in err for f in fragments), err
    assert str(hub) in err                                       # names the cache it looked in
    assert not (tmp_path / "run").exists()


def test_components_come_from_the_same_snapshot_and_a_missing_one_is_named(hub, tmp_path):
    src = tmp_path / "src"
    for sub in ("transformer", "text_encoder", "tokenizer", "vae", "qwen3-vl"):
        (src / sub).mkdir(parents=True)
        (src / sub / "config.json").write_text("{}")
    write_snapshot(hub, "owner/pipe", COMMIT_A, src, refs=["main"])
    write_snapshot(hub, "owner/vl", COMMIT_B, src / "qwen3-vl", refs=["main"])
    write_snapshot(hub, "owner/dit-only", COMMIT_A, src / "qwen3-vl", refs=["main"])       # no folders at all
    sets = ["model.arch={}", "data.kind=folder", "data.path=x", "context.kind=qwen3", "context.teacher_model=owner/vl"]

    parts = resolve_weights(load_config("tiny-cpu", [*sets, "model.pretrained=owner/pipe",
                                                     "model.vae=owner/pipe@main"]))
    snap = hub / "models--owner--pipe" / "snapshots" / COMMIT_A
    assert parts.model.pretrained == str(snap / "transformer") and parts.model.vae == str(snap / "vae")
    assert parts.model.text_encoder is None                 # the sibling of the resolved transformer/ folder
    assert parts.context.teacher_model == str(hub / "models--owner--vl" / "snapshots" / COMMIT_B)

    with pytest.raises(ConfigError, match=r"model.pretrained: owner/dit-only: the snapshot of owner/dit-only "
                                          r"\(commit a{40}, .*\) has no transformer/, text_encoder/, tokenizer/ "
                                          r"folders; run once online"):
        resolve_weights(load_config("tiny-cpu", [*sets, "model.pretrained=owner/dit-only"]))


def test_dry_run_reads_the_cache_and_plans_a_cold_id(two_snapshots, capsys):
    assert main(["train", "--dry-run", "--set", "model.arch={}", "--set", "model.pretrained=owner/tiny@v2"]) == 0
    assert f"weights: {two_snapshots[1] / 'transformer'}" in capsys.readouterr().out
    assert main(["train", "zimage-turbo-lora", "--dry-run", "--set", "model.pretrained=Tongyi-MAI/Z-Image-Turbo"]) == 0
    assert "Tongyi-MAI/Z-Image-Turbo (not found yet" in capsys.readouterr().out      # nothing is downloaded


def test_the_environment_chooses_the_cache(tmp_path):
    """HF_HOME (its hub/ folder) and HF_HUB_OFFLINE as a user sets them, read by a fresh process."""
    home = tmp_path / "home"
    snap = write_snapshot(home / "hub", "owner/tiny", COMMIT_A, tiny_pipeline(tmp_path / "src", 0), refs=["main"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = lambda spec: subprocess.run([sys.executable, "-m", "dopsd_fast.cli", "train", "--dry-run", "--set",
                                       "model.arch={}", "--set", f"model.pretrained={spec}"],
                                      env=env, capture_output=True, text=True, timeout=300)
    done = run("owner/tiny")
    assert done.returncode == 0 and f"weights: {snap / 'transformer'}" in done.stdout, done.stderr
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")           # wins over HF_HOME; offline, an empty cache is a miss
    out = json.dumps(str(tmp_path / "run"))
    done = subprocess.run([sys.executable, "-m", "dopsd_fast.cli", "train", "--set", "model.arch={}", "--set",
                           "model.pretrained=owner/tiny", "--set", f"train.output_dir={out}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"Hugging Face cache {tmp_path / 'empty'}; HF_HUB_OFFLINE=1 is set: run once online" in done.stderr


def test_only_the_folders_a_run_reads_are_downloaded(hub, tmp_path, monkeypatch):
    """Online (snapshot_download stubbed): one call per repo, allow_patterns naming the folders this run reads."""
    snap = tmp_path / "snapshot"                # what the stub "downloaded"; the pixel-space model is real
    tiny_pipeline(snap, 0)
    for sub in ("text_encoder", "tokenizer", "vae"):
        (snap / sub).mkdir()
    calls = []

    def fake(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **_):
        calls.append((repo_id, revision, sorted(allow_patterns), local_files_only))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    qwen = ["data.kind=folder", "data.path=x", "context.kind=qwen3", "context.teacher_model=owner/vl@v1"]
    cases = [
        (["model.pretrained=owner/pipe"], [("owner/pipe", None, ["transformer/*"], False)]),
        ([*qwen, "model.pretrained=owner/pipe@v3"],
         [("owner/pipe", "v3", ["text_encoder/*", "tokenizer/*", "transformer/*", "vae/*"], False),
          ("owner/vl", "v1", ["*.jinja", "*.json", "*.safetensors", "*.txt"], False)]),
        ([*qwen, "model.pretrained=owner/pipe", "model.text_encoder=owner/te", "method.objective=sft"],
         [("owner/pipe", None, ["tokenizer/*", "transformer/*", "vae/*"], False),
          ("owner/te", None, ["text_encoder/*"], False)]),
    ]
    for sets, want in cases:
        calls.clear()
        resolve_weights(load_config("tiny-cpu", ["model.arch={}", *sets]))
        assert calls == want, sets
    calls.clear()
    assert main(["train", "--dry-run", "--set", "model.arch={}", "--set", "model.pretrained=owner/pipe"]) == 0
    assert calls == [("owner/pipe", None, ["transformer/*"], True)]          # a dry run reads the cache only


def _http_error(cls, status):
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return cls(f"{status} Client Error", response=httpx.Response(status, request=httpx.Request("GET", "https://x")))


@pytest.mark.parametrize("error, fragment", [
    (lambda: _http_error(huggingface_hub.errors.RepositoryNotFoundError, 404),
     "model.pretrained: owner/nope@v9: no local path of that name, and no Hugging Face repo owner/nope (or it is "
     "private or gated: `hf auth login` or HF_TOKEN)"),
    (lambda: _http_error(huggingface_hub.errors.RevisionNotFoundError, 404),
     "model.pretrained: owner/nope@v9: the Hugging Face repo owner/nope has no revision 'v9'"),
    (lambda: huggingface_hub.errors.LocalEntryNotFoundError("connection refused"),
     "is not (completely) in the Hugging Face cache"),
])
def test_hub_errors_online_exit_2_naming_the_id(hub, tmp_path, monkeypatch, capsys, error, fragment):
    def fake(*args, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert _train(tmp_path / "run", "owner/nope@v9") == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()

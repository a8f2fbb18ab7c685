"""2 CPU ranks, ZeRO-3 on a pretrained folder: each rank builds the transformer under zero.Init and reads only its
slices from the file (zero3.build_partitioned). The weights, LoRA adapters included, equal the single-process
trainer's, and a rank's start-up peak host memory is about model / world (issue 21: <= 1.3 x model / world + a
fixed overhead)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("deepspeed")

from ds_launch import rank_env  # noqa: E402
from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer  # noqa: E402
from dopsd_fast.train.checkpoint import load_tensors  # noqa: E402
from dopsd_fast.train.config import load_config  # noqa: E402
from dopsd_fast.train.distributed import free_port  # noqa: E402
from dopsd_fast.train.trainer import Trainer  # noqa: E402

# 220 MB in fp32, its largest tensor 11 MB: the weights outweigh the ranks' fixed start-up overhead
MID = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=3, cap_feat_dim=32, axes_lens=[256, 64, 64],
           dim=1024, n_layers=2, n_refiner_layers=1, n_heads=8, n_kv_heads=8, axes_dims=[32, 48, 48])
FIXED_OVERHEAD = 100e6      # 69 MB measured with a 2 MB model: DeepSpeed's engine, gloo, the data, the encoders


def diffusers_folder(path: Path, arch: dict) -> int:
    """A diffusers transformer/ folder of random weights (our module names are diffusers' keys); its bytes."""
    torch.manual_seed(0)
    state = ZImageTransformer(ZImageConfig.from_dict(arch)).state_dict()
    path.mkdir()
    save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
    (path / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel", **arch}))
    return sum(t.numel() * t.element_size() for t in state.values())


def test_partitioned_build_holds_model_over_world_and_the_single_process_weights(tmp_path):
    folder, world, out = tmp_path / "transformer", 2, tmp_path / "startup"
    model = diffusers_folder(folder, MID)
    sets = [f"train.output_dir={tmp_path / 'run'}", "model.arch={}", f"model.pretrained={folder}", "train.resume=null"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}",
           "startup_ranks.py", str(out), *sets, "deepspeed.stage=3"]
    proc = subprocess.run(cmd, env=rank_env(), cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    bound = 1.3 * model / world + FIXED_OVERHEAD
    for rank in range(world):
        row = json.loads(Path(f"{out}-rank{rank}.json").read_text())
        print(f"rank {rank}: start-up peak +{row['peak_growth'] / 1e6:.0f} MB, holds {row['weights'] / 1e6:.0f} MB "
              f"of weights; model {model / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB")
        assert row["weights"] < 0.55 * model        # its slices (and the LoRA adapters, whole), no more
        assert row["peak_growth"] <= bound
    # base from the file, LoRA adapters drawn from the seed as the single-process build draws them
    single = dict(Trainer(load_config("tiny-cpu", sets), progress=False).model.named_parameters())
    gathered = load_tensors(Path(f"{out}-weights.safetensors"))
    assert gathered.keys() == single.keys()
    assert all(torch.equal(gathered[k], single[k].detach()) for k in single)


@pytest.mark.parametrize("key", ["adapter.mode=full", "model.merge_loras"])
def test_a_key_that_needs_the_whole_base_builds_it_whole(tmp_path, monkeypatch, capsys, key):
    """Full fine-tuning copies the base for its teacher and merge_loras adds to it: both build it whole, and say so."""
    from dopsd_fast.train import zero3
    from dopsd_fast.train.build import resolve_plan
    from dopsd_fast.train.deepspeed_engine import DeepSpeedMixin

    def refuse(*args):
        raise AssertionError("built partitioned")

    monkeypatch.setattr(zero3, "build_partitioned", refuse)
    folder = tmp_path / "transformer"
    diffusers_folder(folder, dict(MID, dim=64, n_heads=2, n_kv_heads=2, axes_dims=[8, 12, 12]))
    lora = "model.merge_loras=[some.safetensors]" if key == "model.merge_loras" else key
    cfg = load_config("tiny-cpu", ["model.arch={}", f"model.pretrained={folder}", "deepspeed.stage=3", lora])
    rank0 = type("Rank0", (), {"is_main": True, "world": 2})()
    model = DeepSpeedMixin.build_transformer(rank0, cfg, resolve_plan(cfg), torch.float32, torch.device("cpu"))
    assert not hasattr(next(model.parameters()), "ds_tensor")
    assert f"{key} needs the whole base" in capsys.readouterr().out

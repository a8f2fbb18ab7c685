"""2 CPU ranks, ZeRO-3 on a pretrained folder: each rank builds the transformer under zero.Init and reads only its
slices from the file (zero3.build_partitioned), folds its slices of model.merge_loras' updates, and full
fine-tuning's teacher copies the student's slices. The weights, LoRA adapters and teacher included, equal the
single-process trainer's, and a rank's start-up peak host memory is about what it holds after start-up (issue 21:
<= 1.3 x model / world + a fixed overhead, per role module, plus the optimizer state DeepSpeed builds)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("deepspeed")

from ds_launch import diffusers_folder, rank_env  # noqa: E402
from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer  # noqa: E402
from dopsd_fast.train.checkpoint import load_tensors  # noqa: E402
from dopsd_fast.train.config import load_config  # noqa: E402
from dopsd_fast.train.distributed import free_port  # noqa: E402
from dopsd_fast.train.trainer import Trainer  # noqa: E402

# 220 MB in fp32, its largest tensor 11 MB: the weights outweigh the ranks' fixed start-up overhead
MID = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=3, cap_feat_dim=32, axes_lens=[256, 64, 64],
           dim=1024, n_layers=2, n_refiner_layers=1, n_heads=8, n_kv_heads=8, axes_dims=[32, 48, 48])
FIXED_OVERHEAD = 100e6      # 69 MB measured with a 2 MB model: DeepSpeed's engine, gloo, the data, the encoders


def lora_file(path: Path, arch: dict, rank: int = 4) -> Path:
    """A diffusers-named LoRA on two of the model's linears (alpha = rank), for model.merge_loras."""
    g, dim = torch.Generator().manual_seed(1), arch["dim"]
    tensors = {}
    for module in ("layers.0.attention.to_q", "layers.1.feed_forward.w1"):
        with torch.device("meta"):
            out = ZImageTransformer(ZImageConfig.from_dict(arch)).get_submodule(module).out_features
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, dim, generator=g) * 0.1
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
    save_file(tensors, str(path))
    return path


def launch(out: Path, sets: list[str], world: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}",
           "startup_ranks.py", str(out), *sets, "deepspeed.stage=3"]
    proc = subprocess.run(cmd, env=rank_env(), cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads(Path(f"{out}-rank{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_partitioned_build_holds_model_over_world_and_the_single_process_weights(tmp_path, mode):
    """LoRA and full fine-tuning, each on a base with a LoRA merged in (model.merge_loras): the merge folds each
    rank's slice of the update, and full fine-tuning's teacher copies the student's slices."""
    folder, world, out = tmp_path / "transformer", 2, tmp_path / "startup"
    model = diffusers_folder(folder, MID)
    merged = lora_file(tmp_path / "earlier.safetensors", MID)
    sets = [f"train.output_dir={tmp_path / 'run'}", "model.arch={}", f"model.pretrained={folder}", "train.resume=null",
            f"model.merge_loras=[{merged}]", f"adapter.mode={mode}"]
    rows = launch(out, sets, world)
    roles = 2 if mode == "full" else 1          # full fine-tuning: the student and its teacher copy
    for row in rows:
        # what a rank must hold after start-up: its slices of both roles' weights and its optimizer state
        held = row["weights"] + row["optimizer"]
        bound = 1.3 * held + FIXED_OVERHEAD
        print(f"{mode} rank {row['rank']}: start-up peak +{row['peak_growth'] / 1e6:.0f} MB, holds "
              f"{row['weights'] / 1e6:.0f} MB of weights and {row['optimizer'] / 1e6:.0f} MB of optimizer state; "
              f"model {model / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB")
        assert row["weights"] < 0.55 * roles * model        # its slices (and the LoRA adapters, whole), no more
        assert row["peak_growth"] <= bound
        assert row["peak_growth"] <= 1.3 * roles * model / world + row["optimizer"] + FIXED_OVERHEAD
    # base (merged) from the files, LoRA adapters drawn from the seed as the single-process build draws them
    single = Trainer(load_config("tiny-cpu", sets), progress=False)
    expected = dict(single.model.named_parameters())
    if mode == "full":
        expected |= {f"teacher.{k}": v for k, v in single.roles.teacher_model.named_parameters()}
    gathered = load_tensors(Path(f"{out}-weights.safetensors"))
    assert gathered.keys() == expected.keys()
    assert all(torch.equal(gathered[k], expected[k].detach()) for k in expected)
    with safe_open(folder / "diffusion_pytorch_model.safetensors", "pt") as f:        # the merge happened
        assert not torch.equal(gathered["layers.0.attention.to_q.weight"], f.get_tensor("layers.0.attention.to_q.weight"))

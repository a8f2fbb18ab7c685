"""The shipped world weights (dopsd_fast/world/assets/): architecture, save/load, manifest with hashes.

Files: base/ and turbo/ (diffusers-format transformer folders: config.json + diffusion_pytorch_model.safetensors,
keys = Z-Image checkpoint keys, so `model.pretrained` loads them), encoders.safetensors
(tiny Qwen3 LM + patch embedder), evaluator.safetensors, manifest.json (configs, seeds, steps, sha256).
"""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.loading import WEIGHTS, load_zimage_transformer
from ..models.z_image import ZImageConfig, ZImageTransformer
from .encoders import WorldEncoders

# Pixel space, 16x16, patch 4: 16 image tokens (padded to 32 by the model); 4 + 1 + 1 blocks of width 96 (about 1.2 M parameters).
DIT_ARCH = {"all_patch_size": [4], "in_channels": 3, "dim": 96, "n_layers": 4, "n_refiner_layers": 1, "n_heads": 4,
            "n_kv_heads": 4, "cap_feat_dim": 64, "axes_dims": [8, 8, 8], "axes_lens": [128, 16, 16]}


def assets_dir() -> Path:
    return Path(str(resources.files("dopsd_fast.world") / "assets"))


def build_dit() -> ZImageTransformer:
    return ZImageTransformer(ZImageConfig.from_dict(DIT_ARCH))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_module(module: nn.Module, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in module.state_dict().items()}, str(path))
    return sha256(path)


def load_module(module: nn.Module, path: Path) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; make it with the scripts in scripts/world_*.py "
                                "(see dopsd_fast/world/assets/manifest.json for the exact commands)")
    state = load_file(str(path))
    own = module.state_dict()
    bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{path}: keys or shapes do not match the world architecture: {bad[:5]}")
    module.load_state_dict(state)
    return module


def save_dit(model: ZImageTransformer, folder: Path) -> str:
    """A diffusers-format folder; returns the weights' sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel", **DIT_ARCH}, indent=1) + "\n")
    return save_module(model, folder / f"{WEIGHTS}.safetensors")


def load_dit(name: str, folder: Path | None = None) -> ZImageTransformer:
    path = (folder or assets_dir()) / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: missing; make it with scripts/world_pretrain.py and scripts/world_distill.py")
    return load_zimage_transformer(path).eval().requires_grad_(False)


def load_encoders(folder: Path | None = None) -> WorldEncoders:
    enc = load_module(WorldEncoders(), (folder or assets_dir()) / "encoders.safetensors").eval()
    return enc.requires_grad_(False)


def update_manifest(folder: Path, entry: str, record: dict) -> None:
    """Merge one script's record (config, seed, steps, file hashes) into manifest.json."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest[entry] = record
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")

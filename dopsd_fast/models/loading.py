"""Load a diffusers-format transformer folder (config.json + one or sharded safetensors) into our model.

Keys and shapes are checked against the model from the file headers before any tensor is read, so a wrong
folder fails fast with the names that differ. Weights are never unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .z_image import ZImageConfig, ZImageTransformer

WEIGHTS = "diffusion_pytorch_model"


class WeightsError(RuntimeError):
    """Weights that cannot be loaded; the message names the file and what differs."""


def _weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> the shard file holding it."""
    index, single = folder / f"{WEIGHTS}.safetensors.index.json", folder / f"{WEIGHTS}.safetensors"
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
            raise WeightsError(f"{index}: not a safetensors index (needs a 'weight_map'): {err}") from None
        files = {name: folder / shard for name, shard in mapping.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise WeightsError(f"{index} lists shards that are not there: {', '.join(missing[:3])}; "
                               "the download is incomplete")
        return files
    if single.is_file():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise WeightsError(f"{folder}: no {single.name} or {index.name}; point model.pretrained at the "
                       "transformer/ folder of a diffusers checkpoint")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None


def read_config(folder: Path) -> ZImageConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{path}: missing; a diffusers transformer folder has config.json beside its weights")
    raw = json.loads(path.read_text())
    if raw.pop("siglip_feat_dim", None) is not None:
        raise WeightsError(f"{path}: siglip_feat_dim is set (Z-Image omni weights); only text-to-image weights load")
    try:
        return ZImageConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{path}: {err}") from None


def describe_mismatch(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """None when names and shapes agree; otherwise a one-line summary of what is missing, extra, mis-shaped."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [f"{k}: file {found[k]} vs model {expected[k]}" for k in sorted(expected) if k in found and found[k] != expected[k]]
    parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"] if missing else []
    parts += [f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})"] if extra else []
    parts += [f"{len(shapes)} mis-shaped (e.g. {'; '.join(shapes[:3])})"] if shapes else []
    return "; ".join(parts) or None


def load_zimage_transformer(folder: str | Path, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu") -> ZImageTransformer:
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a directory; set model.pretrained to a diffusers transformer/ folder")
    config = read_config(folder)
    with torch.device("meta"):
        model = ZImageTransformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    files = _weight_map(folder)
    found = {}
    for path in sorted(set(files.values())):
        with _open(path) as f:
            found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if files.get(k) == path})
    mismatch = describe_mismatch(found, expected)
    if mismatch:
        raise WeightsError(f"{folder}: weights do not match the model ({config}): {mismatch}")
    state = {}
    for path in sorted(set(files.values())):
        with _open(path) as f:
            for k in f.keys():
                if files.get(k) == path:
                    state[k] = f.get_tensor(k).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    return model

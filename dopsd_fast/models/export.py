"""Export a trained transformer: LoRA for diffusers/PEFT and for ComfyUI, or full weights in the diffusers layout.

- ``save_diffusers_lora``: ``pytorch_lora_weights.safetensors`` with ``transformer.<module>.lora_A/B.weight`` and
  the PEFT config (r, lora_alpha, target_modules) in the ``lora_adapter_metadata`` header, which
  ``ZImagePipeline.load_lora_weights`` reads.
- ``save_comfyui_lora``: ComfyUI's own Z-Image module names (``diffusion_model.`` prefix, fused
  ``attention.qkv``, ``attention.out``) with ``lora_down/lora_up/alpha``. The q, k, v adapters become one
  rank-3r adapter on the fused projection: down = [A_q; A_k; A_v], up = blockdiag(B_q, B_k, B_v), alpha x 3,
  which is exactly the three updates stacked.
- ``save_full_weights``: base + scale * B A merged (or the fully fine-tuned weights), sharded safetensors with an
  index, ``config.json`` for diffusers' ``ZImageTransformer2DModel``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..nn.lora_linear import LoRALinear

LORA_FILE = "pytorch_lora_weights.safetensors"
# diffusers module name -> ComfyUI module name (the rest is equal)
COMFY_RENAMES = {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1": "final_layer", "attention.to_out.0": "attention.out"}


def lora_modules(model: nn.Module, adapter: str = "student") -> dict[str, LoRALinear]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear) and adapter in m.lora_A}
    if not found:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter!r} to export")
    return found


def _contiguous(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.detach().to(dtype or t.dtype).contiguous().cpu()


def save_diffusers_lora(model: nn.Module, out_dir: str | Path, adapter: str = "student",
                        dtype: torch.dtype | None = None) -> Path:
    mods = lora_modules(model, adapter)
    ranks, alphas = {m.rank for m in mods.values()}, {m.alpha for m in mods.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"one rank/alpha expected for the PEFT config, got ranks {ranks}, alphas {alphas}")
    tensors = {}
    for name, m in mods.items():
        tensors[f"transformer.{name}.lora_A.weight"] = _contiguous(m.lora_A[adapter], dtype)
        tensors[f"transformer.{name}.lora_B.weight"] = _contiguous(m.lora_B[adapter], dtype)
    config = {"r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": sorted(mods), "lora_dropout": 0.0,
              "bias": "none", "init_lora_weights": "gaussian"}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / LORA_FILE), metadata=meta)
    return out / LORA_FILE


def comfy_name(name: str) -> str:
    for ours, theirs in COMFY_RENAMES.items():
        name = name.replace(ours, theirs)
    return name


def save_comfyui_lora(model: nn.Module, path: str | Path, adapter: str = "student",
                      dtype: torch.dtype | None = None) -> Path:
    mods = lora_modules(model, adapter)
    tensors: dict[str, Tensor] = {}

    def put(name: str, down: Tensor, up: Tensor, alpha: float) -> None:
        key = f"diffusion_model.{name}"
        tensors[f"{key}.lora_down.weight"] = _contiguous(down, dtype)
        tensors[f"{key}.lora_up.weight"] = _contiguous(up, dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))

    blocks = {n.rsplit(".to_", 1)[0] for n in mods if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")}
    for block in sorted(blocks):
        parts = [mods.get(f"{block}.to_{p}") for p in "qkv"]
        ref = next(m for m in parts if m is not None)
        r, alpha = ref.rank, ref.alpha
        if any(m is not None and (m.rank, m.alpha) != (r, alpha) for m in parts):
            raise ValueError(f"{block}: q/k/v adapters differ in rank or alpha; ComfyUI's fused qkv needs one")
        downs, ups = [], []
        for m in parts:
            w = ref.lora_A[adapter]
            downs.append(m.lora_A[adapter] if m else torch.zeros_like(w))
            ups.append(m.lora_B[adapter] if m else torch.zeros(ref.out_features, r, dtype=w.dtype, device=w.device))
        put(comfy_name(block) + ".qkv", torch.cat(downs), torch.block_diag(*ups), 3 * alpha)
    for name, m in mods.items():
        if name.rsplit(".", 1)[-1] not in ("to_q", "to_k", "to_v"):
            put(comfy_name(name), m.lora_A[adapter], m.lora_B[adapter], m.alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


@torch.no_grad()
def merged_state_dict(model: nn.Module, adapter: str | None = "student", dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Base keys only (adapter tensors dropped), each LoRA's update folded into its weight."""
    state = {}
    for name, t in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        state[name] = t
    if adapter is not None:
        for name, m in lora_modules(model, adapter).items():
            delta = m.scale * (m.lora_B[adapter].float() @ m.lora_A[adapter].float())
            state[f"{name}.weight"] = (m.weight.float() + delta).to(m.weight.dtype)
    return {k: _contiguous(v, dtype) for k, v in state.items()}


def save_full_weights(model: nn.Module, out_dir: str | Path, adapter: str | None = "student",
                      dtype: torch.dtype | None = None, max_shard_bytes: int = 10 * 1024**3) -> Path:
    """A diffusers ``transformer/`` folder; ``adapter=None`` for fully fine-tuned weights (no LoRA to merge)."""
    from .loading import WEIGHTS

    state = merged_state_dict(model, adapter, dtype)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out / f"{WEIGHTS}.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"{WEIGHTS}-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / f"{WEIGHTS}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"_class_name": "ZImageTransformer2DModel",
              **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.config).items()}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out

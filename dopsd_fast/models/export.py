"""Export a trained Z-Image or FLUX.2 [klein] transformer: LoRA for diffusers/PEFT and for ComfyUI, or full
weights in the diffusers layout. What differs between the families (ComfyUI names, diffusers class) comes from
the family adapter.

- ``save_diffusers_lora``: ``pytorch_lora_weights.safetensors`` with ``transformer.<module>.lora_A/B.weight`` and
  the PEFT config (r, lora_alpha, target_modules) in the ``lora_adapter_metadata`` header, which
  ``ZImagePipeline`` / ``Flux2KleinPipeline.load_lora_weights`` read.
- ``save_comfyui_lora``: the names of ComfyUI's own model (``diffusion_model.`` prefix; Z-Image's fused
  ``attention.qkv``, ``attention.out``; FLUX.2's BFL ``double_blocks`` / ``single_blocks``) with
  ``lora_down/lora_up/alpha``. Adapters on the q, k, v parts of a fused projection become one rank-3r adapter:
  down = [A_q; A_k; A_v], up = blockdiag(B_q, B_k, B_v), alpha x 3, which is exactly the three updates stacked.
- ``save_full_weights``: base + scale * B A merged (or the fully fine-tuned weights), sharded safetensors with an
  index, ``config.json`` for the family's diffusers transformer class.
Each refuses a tensor holding NaN or Inf by name before writing anything (``refuse_nonfinite``).
``lora_files`` gives the two LoRA files' tensors without writing them: a checkpoint writes them beside the training
state (train.export_formats). ``lora_load.read_lora`` reads either back (adapter.init_from).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..nn.lora_linear import LoRALinear
from .adapter import model_family
from .loading import WeightsError, first_nonfinite

LORA_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "lora_comfyui.safetensors"


def lora_modules(model: nn.Module, adapter: str = "student") -> dict[str, LoRALinear]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear) and adapter in m.lora_A}
    if not found:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter!r} to export")
    return found


def _contiguous(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.detach().to(dtype or t.dtype).contiguous().cpu()


def refuse_nonfinite(path: Path, tensors: dict[str, Tensor]) -> None:
    """WeightsError naming the first tensor holding NaN or Inf (after the cast to the export dtype), before
    anything of ``path`` is written: an export never carries a non-finite weight."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise WeightsError(f"{path}: not written: tensor {bad!r} holds NaN or Inf values; export a checkpoint written "
                           "before the run diverged (--checkpoint step-XXXXXX)")


def _adapter_weights(mods: dict[str, LoRALinear], adapter: str,
                     tensors: dict[str, Tensor] | None) -> dict[str, tuple[Tensor, Tensor]]:
    """Module name -> (A (r, in), B (out, r)): the modules' own, or taken from ``tensors`` keyed as a checkpoint's
    student (``<module>.lora_A.<adapter>``), where the modules hold only slices (ZeRO-3 gathers whole ones)."""
    if tensors is None:
        return {n: (m.lora_A[adapter], m.lora_B[adapter]) for n, m in mods.items()}
    return {n: (tensors[f"{n}.lora_A.{adapter}"], tensors[f"{n}.lora_B.{adapter}"]) for n in mods}


def diffusers_lora_tensors(model: nn.Module, adapter: str = "student", dtype: torch.dtype | None = None,
                           tensors: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and header of ``pytorch_lora_weights.safetensors`` (``tensors``: see ``_adapter_weights``)."""
    mods = lora_modules(model, adapter)
    ranks, alphas = {m.rank for m in mods.values()}, {m.alpha for m in mods.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"one rank/alpha expected for the PEFT config, got ranks {ranks}, alphas {alphas}")
    out = {}
    for name, (a, b) in _adapter_weights(mods, adapter, tensors).items():
        out[f"transformer.{name}.lora_A.weight"] = _contiguous(a, dtype)
        out[f"transformer.{name}.lora_B.weight"] = _contiguous(b, dtype)
    config = {"r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": sorted(mods), "lora_dropout": 0.0,
              "bias": "none", "init_lora_weights": "gaussian"}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    return out, meta


def save_diffusers_lora(model: nn.Module, out_dir: str | Path, adapter: str = "student",
                        dtype: torch.dtype | None = None) -> Path:
    tensors, meta = diffusers_lora_tensors(model, adapter, dtype)
    out = Path(out_dir)
    refuse_nonfinite(out / LORA_FILE, tensors)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / LORA_FILE), metadata=meta)
    return out / LORA_FILE


def comfyui_lora_tensors(model: nn.Module, adapter: str = "student", dtype: torch.dtype | None = None,
                         tensors: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The tensors of ComfyUI's LoRA file (``tensors``: see ``_adapter_weights``)."""
    family = model_family(model.config)
    mods = lora_modules(model, adapter)
    weights = _adapter_weights(mods, adapter, tensors)
    fused: dict[str, list] = {}     # ComfyUI module -> per part (LoRA module, A, B, row map), None where not adapted
    for name, m in mods.items():
        target, part, parts, rows = family.comfy_weight(f"{name}.weight")
        fused.setdefault(target.removesuffix(".weight"), [None] * parts)[part] = (m, *weights[name], rows)
    out: dict[str, Tensor] = {}
    for target, slots in sorted(fused.items()):
        ref, a = next((s[0], s[1]) for s in slots if s)
        r, alpha = ref.rank, ref.alpha
        if any(s and (s[0].rank, s[0].alpha) != (r, alpha) for s in slots):
            raise ValueError(f"{target}: the adapters fused into it differ in rank or alpha (ComfyUI's file holds "
                             "one of each)")
        # a part without an adapter adds nothing: zero rows of the same size (fused parts are equal blocks)
        downs = [s[1] if s else torch.zeros_like(a) for s in slots]
        ups = [s[3](s[2]) if s else a.new_zeros(ref.out_features, r) for s in slots]
        key = f"diffusion_model.{target}"
        out[f"{key}.lora_down.weight"] = _contiguous(torch.cat(downs), dtype)
        out[f"{key}.lora_up.weight"] = _contiguous(torch.block_diag(*ups), dtype)
        out[f"{key}.alpha"] = torch.tensor(float(len(slots) * alpha))   # ComfyUI scales by alpha / (parts r)
    return out


def save_comfyui_lora(model: nn.Module, path: str | Path, adapter: str = "student",
                      dtype: torch.dtype | None = None) -> Path:
    tensors = comfyui_lora_tensors(model, adapter, dtype)
    path = Path(path)
    refuse_nonfinite(path, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def lora_files(model: nn.Module, formats: list[str], tensors: dict[str, Tensor] | None = None,
               adapter: str = "student") -> dict[str, tuple[dict[str, Tensor], dict[str, str]]]:
    """File name -> (tensors, header) of each LoRA format in ``formats`` (``diffusers``: ``LORA_FILE``,
    ``comfyui``: ``COMFYUI_FILE``), as ``dopsd export`` writes them (the adapter's own dtype); what a checkpoint
    writes beside its training state (train.export_formats)."""
    files = {}
    if "diffusers" in formats:
        files[LORA_FILE] = diffusers_lora_tensors(model, adapter, None, tensors)
    if "comfyui" in formats:
        files[COMFYUI_FILE] = (comfyui_lora_tensors(model, adapter, None, tensors), {"format": "pt"})
    return files


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
    refuse_nonfinite(Path(out_dir), state)
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
    config = {"_class_name": model_family(model.config).diffusers_class,
              **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.config).items()}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out

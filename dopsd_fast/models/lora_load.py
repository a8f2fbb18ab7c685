"""Read a LoRA file into our adapters (``adapter.init_from``): the inverse of export.py's LoRA writers.

The layout is told from the keys, each ``<prefix><module>.<leaf>`` (prefix ``transformer.``, ``base_model.model.``,
``diffusion_model.`` or none):
- diffusers/PEFT: leaves ``lora_A.weight`` / ``lora_B.weight``; alpha from the ``lora_adapter_metadata`` header
  (``transformer.lora_alpha``, as ``save_diffusers_lora`` writes it), else a per-module ``alpha`` tensor, else
  alpha = rank (diffusers' default for a file without either).
- ComfyUI / kohya: leaves ``lora_down.weight`` / ``lora_up.weight`` / ``alpha`` (no alpha: alpha = rank).
Module names are ours (= diffusers') or those of ComfyUI's model (Z-Image's fused ``attention.qkv`` and
``attention.out``; FLUX.2's BFL names), which the family's ``comfy_weight`` table maps back. A fused module's
adapter splits into its parts: one written by ``save_comfyui_lora`` is block-diagonal (rank ``parts * r``, alpha
``parts * alpha``), each part gets its own block; a rank-r adapter of another trainer on the fused weight gives
each part the shared down and its rows of up. Either way each part's update equals the file's.

Every adapted module of the file must be one of the model's LoRA modules with the model's rank and alpha (the
update ``alpha / r * B A`` then trains on exactly as our own adapter would); modules the file does not adapt keep
their fresh adapter (B = 0: no update). Tensors are read through safetensors only; a NaN or Inf is refused.
Problems raise ``WeightsError`` naming the file, the tensor and the fix.

``merge_loras`` (``model.merge_loras``) reads the same files into the base weights instead: any rank and alpha,
our module names only, folded before the adapters exist (a continual plan's earlier stages, train/continual.py).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .adapter import model_family
from .export import COMFYUI_FILE, LORA_FILE, lora_modules
from .loading import WeightsError, first_nonfinite

PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")
LEAVES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
          "alpha": "alpha"}
_KEY = re.compile(rf"(?P<module>.+)\.(?P<leaf>{'|'.join(map(re.escape, LEAVES))})")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def lora_file(source: str | Path) -> Path:
    """The LoRA file of ``source``: a ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors``
    (or only ComfyUI's ``lora_comfyui.safetensors``, as ``dopsd export`` writes them)."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in (LORA_FILE, COMFYUI_FILE):
            if (path / name).is_file():
                return path / name
        found = ", ".join(sorted(p.name for p in path.glob("*.safetensors"))) or "none"
        raise WeightsError(f"{path}: a folder without {LORA_FILE} (.safetensors files there: {found}); pass the "
                           "path of the LoRA .safetensors file itself")
    if not path.is_file():
        hub = (" Hugging Face ids are not resolved yet: download the LoRA (`hf download ID --local-dir DIR`) and "
               "pass its local path." if _HUB_ID.fullmatch(str(source)) and not str(source).startswith(".") else "")
        raise WeightsError(f"{path}: no such file or folder; pass a LoRA .safetensors file (diffusers/PEFT or ComfyUI "
                           f"names) or a folder holding {LORA_FILE}.{hub}")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: not a .safetensors file; LoRA weights are read only from safetensors (never "
                           "pickle): convert it, or pass the .safetensors file")
    return path


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err}); pass a LoRA written by `dopsd export`, "
                           "`dopsd train` (checkpoints/step-XXXXXX/) or diffusers") from None


def _header_alpha(path: Path, meta: dict[str, str]) -> float | None:
    """``lora_alpha`` of the PEFT config that diffusers' writers put in the header, if any."""
    raw = meta.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
        alpha = config.get("transformer.lora_alpha", config.get("lora_alpha"))
    except (json.JSONDecodeError, AttributeError):
        raise WeightsError(f"{path}: the lora_adapter_metadata header is not a JSON object; the file is corrupt or "
                           "was edited") from None
    return None if alpha is None else float(alpha)


def _alpha(slot: dict[str, Tensor], header_alpha: float | None) -> float:
    """A module's alpha: its own tensor, else the header's, else its rank (diffusers' default for neither)."""
    if "alpha" in slot:
        return float(slot["alpha"])
    return header_alpha if header_alpha is not None else float(slot["down"].shape[0])


def _group(path: Path, tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """File module (prefix dropped) -> {"down", "up", "alpha"}."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise WeightsError(f"{path}: tensor {key!r} is not a LoRA tensor (expected <module>.lora_A/lora_B.weight "
                               "or <module>.lora_down/lora_up.weight and .alpha); pass a transformer LoRA file")
        module = m["module"]
        for prefix in PREFIXES:
            if module.startswith(prefix):
                module = module[len(prefix):]
                break
        slot = modules.setdefault(module, {})
        if LEAVES[m["leaf"]] in slot:
            raise WeightsError(f"{path}: module {module!r} appears twice (tensor {key!r}); the file mixes prefixes")
        slot[LEAVES[m["leaf"]]] = t
    for module, slot in modules.items():
        if "down" not in slot or "up" not in slot:
            raise WeightsError(f"{path}: module {module!r} lacks its {'up' if 'down' in slot else 'down'} tensor; "
                               "the file is incomplete")
        if slot["down"].dim() != 2 or slot["up"].dim() != 2 or slot["up"].shape[1] != slot["down"].shape[0]:
            raise WeightsError(f"{path}: module {module!r}: down {tuple(slot['down'].shape)} and up "
                               f"{tuple(slot['up'].shape)} are not a LoRA pair (r, in) and (out, r)")
    return modules


def _targets(model: nn.Module, adapter: str) -> dict[str, list]:
    """File module name -> per part (our module name, LoRALinear, row map) or None: our names directly (one
    part), and ComfyUI's names through the family's table (fused modules: several parts)."""
    family = model_family(model.config)
    mods = lora_modules(model, adapter)
    out: dict[str, list] = {name: [(name, m, lambda w: w)] for name, m in mods.items()}
    for name, m in mods.items():
        try:
            target, part, parts, rows = family.comfy_weight(f"{name}.weight")
        except ValueError:          # a module ComfyUI's model has no name for: only our name reaches it
            continue
        target = target.removesuffix(".weight")
        if target == name:
            continue
        out.setdefault(target, [None] * parts)[part] = (name, m, rows)     # rows: each table's map is its own inverse
    return out


def _split(path: Path, module: str, slot: dict[str, Tensor], parts: list, default_alpha: float | None):
    """(our name, A, B) of each adapted part of file module ``module``, after checking rank, alpha and shapes."""
    down, up = slot["down"].float(), slot["up"].float()
    n, R = len(parts), down.shape[0]
    alpha = _alpha(slot, default_alpha)
    ref = next(p[1] for p in parts if p)
    r = ref.rank
    out_rows = up.shape[0] // n
    if up.shape[0] != n * out_rows:
        raise WeightsError(f"{path}: module {module!r}: up has {up.shape[0]} rows, not {n} equal parts")
    blocks = [up[i * out_rows:(i + 1) * out_rows] for i in range(n)]
    if n > 1 and R == n * r and all(not blocks[i][:, j * r:(j + 1) * r].any()
                                    for i in range(n) for j in range(n) if i != j):
        # block-diagonal, as save_comfyui_lora writes: part i is down rows i*r.. and its up block
        pairs = [(down[i * r:(i + 1) * r], blocks[i][:, i * r:(i + 1) * r]) for i in range(n)]
        rank, alpha = r, alpha / n
    else:
        pairs, rank = [(down, b) for b in blocks], R
    if rank != r or not math.isclose(alpha, ref.alpha, rel_tol=1e-6):
        raise WeightsError(f"{path}: module {module!r} has rank {rank}, alpha {alpha:g}, but this run's adapter has "
                           f"rank {r}, alpha {ref.alpha:g}; set the file's values (--set adapter.rank={rank} --set "
                           f"adapter.alpha={alpha:g})")
    found = []
    for i, (a, b) in enumerate(pairs):
        if parts[i] is None:
            if b.any():
                raise WeightsError(f"{path}: module {module!r} adapts part {i} of {n}, which this run's "
                                   "adapter.targets leave out; add that projection to adapter.targets")
            continue
        name, m, rows = parts[i]
        b = rows(b)
        if tuple(a.shape) != (r, m.in_features) or tuple(b.shape) != (m.out_features, r):
            raise WeightsError(f"{path}: module {module!r} holds down {tuple(a.shape)}, up {tuple(b.shape)} for "
                               f"{name}, which needs ({r}, {m.in_features}) and ({m.out_features}, {r}); the LoRA "
                               "was trained on another model (model.pretrained / model.arch)")
        found.append((name, a, b))
    return found


def read_lora(source: str | Path, model: nn.Module, adapter: str = "student") -> tuple[dict[str, Tensor], Path, int]:
    """The LoRA of ``source`` as the tensors of ``model``'s adapter ``adapter`` (``<module>.lora_A.<adapter>``,
    ``.lora_B.<adapter>``, fp32), its file, and how many of the model's LoRA modules it leaves out (they keep
    their fresh adapter). WeightsError names the file and the fix."""
    path = lora_file(source)
    tensors, meta = _read(path)
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors; pass a LoRA file")
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise WeightsError(f"{path}: tensor {bad!r} holds NaN or Inf values; start from a LoRA written before its "
                           "run diverged")
    default_alpha = _header_alpha(path, meta)
    targets = _targets(model, adapter)
    out: dict[str, Tensor] = {}
    for module, slot in sorted(_group(path, tensors).items()):
        if module not in targets:
            ours = sorted(lora_modules(model, adapter))
            raise WeightsError(f"{path}: module {module!r} is not one of this run's {len(ours)} LoRA modules "
                               f"({ours[0]}, ...); add its projection to adapter.targets, or check that the LoRA "
                               "is for this model family and size")
        for name, a, b in _split(path, module, slot, targets[module], default_alpha):
            if f"{name}.lora_A.{adapter}" in out:
                raise WeightsError(f"{path}: {name} is adapted twice (under our and ComfyUI's name); keep one")
            out[f"{name}.lora_A.{adapter}"], out[f"{name}.lora_B.{adapter}"] = a.contiguous(), b.contiguous()
    missing = len(lora_modules(model, adapter)) - len(out) // 2
    return out, path, missing


@torch.no_grad()
def merge_loras(model: nn.Module, sources: list[str]) -> None:
    """``model.merge_loras``: fold each LoRA of ``sources``, in order, into ``model``'s base weights before any
    adapter is injected: ``W <- (W + alpha / r * B A)`` computed in fp32 and rounded once to W's dtype, as
    ``export.merged_state_dict`` folds a trained adapter, so a continual plan's merged base equals the previous
    stage's merged export bit for bit. Any rank and alpha (each file's own); module names ours (= diffusers'),
    as ``pytorch_lora_weights.safetensors`` writes them."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for source in sources:
        try:
            path = lora_file(source)
        except WeightsError as err:
            raise WeightsError(f"model.merge_loras: {err}") from None
        tensors, meta = _read(path)
        bad = first_nonfinite(tensors)
        if bad is not None:
            raise WeightsError(f"model.merge_loras: {path}: tensor {bad!r} holds NaN or Inf values")
        default_alpha = _header_alpha(path, meta)
        for module, slot in sorted(_group(path, tensors).items()):
            m = linears.get(module)
            down, up = slot["down"].float(), slot["up"].float()
            shape = tuple(up.shape[:1]) + tuple(down.shape[1:])
            if m is None or shape != tuple(getattr(m.weight, "ds_shape", m.weight.shape)):
                raise WeightsError(f"model.merge_loras: {path}: module {module!r} is not a linear layer of this "
                                   f"model with weight {shape}; merge a diffusers-named LoRA ({LORA_FILE}) trained "
                                   "on this model")
            scale = _alpha(slot, default_alpha) / down.shape[0]
            _fold(m.weight, scale * (up.to(m.weight.device) @ down.to(m.weight.device)))


def _fold(weight: Tensor, delta: Tensor) -> None:
    """``W <- W + delta`` in fp32, rounded once to W's dtype. A ZeRO-3 parameter built partitioned (its whole weight
    never on this rank) folds this rank's slice of ``delta`` into its slice: the same values, elementwise."""
    if hasattr(weight, "ds_tensor"):
        from ..train.zero3 import own_slice

        weight, delta = weight.ds_tensor, own_slice(weight, delta)
    weight.copy_((weight.float() + delta).to(weight.dtype))

"""LoRA on a frozen nn.Linear, with several named adapters over one shared base weight.

D-OPSD keeps two adapters with the same config on one frozen DiT: ``student`` (trainable) and ``teacher``
(its EMA, frozen). The base ``weight``/``bias`` keep their original parameter names, so the model's
state-dict keys still equal the checkpoint keys; adapters add ``<name>.lora_A.<adapter>`` [r, in] and
``<name>.lora_B.<adapter>`` [out, r] (PEFT's shapes).

Adapters are fp32 whatever the base's dtype: they are the trainable weights (and the EMA teacher's master), and a
bf16 adapter would round most AdamW updates at lr 1e-4 away. Each forward reads a copy in the base's dtype, so
compute stays in ``model.dtype`` and the gradient reaching the fp32 adapter is the one of that copy.

``forward`` runs the one active adapter (plain torch, what the trainer uses); ``forward_segments`` runs packed
rows whose segments use different adapters in one call of the fused op ``dopsd_fast.ops.lora_linear.lora_linear``:
one base GEMM, a LoRA term per segment.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.lora_linear import lora_linear


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, adapters: list[str], rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        w = base.weight
        for name in adapters:
            # PEFT "gaussian" init: A ~ N(0, 1/r), B = 0, so every adapter starts as the exact base model.
            self.lora_A[name] = nn.Parameter(torch.randn(rank, self.in_features, device=w.device) / rank)
            self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device))
        self.active_adapter: str | None = adapters[0]

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.active_adapter is None:
            return y
        a, b = self.lora_A[self.active_adapter], self.lora_B[self.active_adapter]
        return y + self.scale * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    @property
    def adapter_names(self) -> list[str]:
        """Adapter names in ParameterDict order: index i here is adapter i in ``forward_segments``' tensors."""
        return list(self.lora_A.keys())

    def forward_segments(self, x: Tensor, seg_offsets: Tensor | Sequence[int],
                         seg_adapters: Sequence[str | None] | Tensor) -> Tensor:
        """Packed rows, one adapter per contiguous row segment; ignores ``active_adapter``.

        x: (..., in), the leading dims flattened to T rows; seg_offsets: int32 (S+1,) tensor on x's device (or a
        list of ints) from 0 to T; seg_adapters: S adapter names (None = base only), or an int32 (S,) tensor of
        indices into ``adapter_names`` (-1 = base only). Returns (..., out). Equals running each segment through
        ``forward`` with that adapter active; gradients reach only the adapters that require grad. The fused op
        reads the fp32 adapters in x's dtype itself (and returns their gradients in fp32).
        """
        if not isinstance(seg_offsets, Tensor):
            seg_offsets = torch.tensor(list(seg_offsets), dtype=torch.int32, device=x.device)
        if not isinstance(seg_adapters, Tensor):
            names = self.adapter_names
            seg_adapters = torch.tensor([-1 if n is None else names.index(n) for n in seg_adapters],
                                        dtype=torch.int32, device=x.device)
        return lora_linear(x, self.weight, self.bias, list(self.lora_A.values()), list(self.lora_B.values()),
                           self.scale, seg_offsets, seg_adapters)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, "
                f"adapters={list(self.lora_A.keys())}, active={self.active_adapter}")


def inject_lora(model: nn.Module, targets: list[str], adapters: list[str], rank: int, alpha: float) -> list[str]:
    """Replace every nn.Linear whose qualified name ends with one of ``targets``; returns the replaced names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, adapters, rank, alpha))
            replaced.append(name)
    if not replaced:
        raise ValueError(f"adapter.targets {targets} matched no nn.Linear in {type(model).__name__}; "
                         f"check the module names (e.g. 'attention.to_q')")
    return replaced


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.active_adapter = name


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Qualified name -> parameter for one adapter, in a stable order."""
    return {n: p for n, p in model.named_parameters() if n.endswith(f".lora_A.{name}") or n.endswith(f".lora_B.{name}")}

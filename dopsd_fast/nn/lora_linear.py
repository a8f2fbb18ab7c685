"""LoRA on a frozen nn.Linear, with several named adapters over one shared base weight.

D-OPSD keeps two adapters with the same config on one frozen DiT: ``student`` (trainable) and ``teacher``
(its EMA, frozen). The base ``weight``/``bias`` keep their original parameter names, so the model's
state-dict keys still equal the checkpoint keys; adapters add ``<name>.lora_A.<adapter>`` [r, in] and
``<name>.lora_B.<adapter>`` [out, r] (PEFT's shapes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
            self.lora_A[name] = nn.Parameter(torch.randn(rank, self.in_features, device=w.device, dtype=w.dtype) / rank)
            self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.active_adapter: str | None = adapters[0]

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.active_adapter is None:
            return y
        a, b = self.lora_A[self.active_adapter], self.lora_B[self.active_adapter]
        return y + self.scale * F.linear(F.linear(x, a), b)

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

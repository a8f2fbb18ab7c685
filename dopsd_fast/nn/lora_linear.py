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

``quantize_base`` (``model.base_precision=fp8``) turns the frozen base into e4m3 with per-output-row fp32 scales
(ops/fp8_linear.py); ``forward`` then runs the base through ``fp8_linear`` and the adapters as before.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.fp8_linear import INPUT_GRADS, fp8_linear
from ..ops.lora_linear import lora_linear
from ..ops.reference import quantize_rowwise


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
        self.register_buffer("weight_scale", None, persistent=False)   # (out,) fp32 once quantize_base ran
        self.input_grad = "bf16"

    def quantize_base(self, input_grad: str = "bf16") -> None:
        """The frozen base weight -> e4m3 (out, in) + one fp32 scale per output row, in place, once.

        ``weight`` stays a frozen parameter of that name (now float8_e4m3fn); the scales are a non-persistent buffer:
        the quantised base is derived at load from the original weights and never saved. ``input_grad`` "bf16" |
        "e5m2": the precision of the input-gradient GEMM (ops/fp8_linear.py).
        """
        if self.weight.requires_grad:
            raise ValueError("quantize_base: the base weight is trainable; only a frozen base (LoRA) can be FP8")
        if input_grad not in INPUT_GRADS:
            raise ValueError(f"input_grad={input_grad!r}: expected one of {INPUT_GRADS}")
        q, scale = quantize_rowwise(self.weight.detach())
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = scale
        self.input_grad = input_grad

    def forward(self, x: Tensor) -> Tensor:
        if self.weight_scale is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = fp8_linear(x, self.weight, self.weight_scale, self.bias, self.input_grad)
        if self.active_adapter is None:
            return y
        a, b = self.lora_A[self.active_adapter], self.lora_B[self.active_adapter]
        down = F.linear(x, a.to(x.dtype))
        # The up-projection's GEMM adds scale * down B^T to the base output (addmm: beta 1, alpha scale), the same sum
        # as PEFT's `y + B(A(x)) * scale` in at most one copy of the (rows, out) output where that makes two passes
        # forward (scale, sum) and one backward: on a cpu-small FFN up-projection 1.22x its speed forward without
        # grad, 1.10x backward, 1.09x forward + backward (bench/results/2026-12-06-cpu-ops/bench_lora_module.json,
        # medians of 100 rounds; reruns move them by ~0.1). In place without grad (the teacher's forwards); with grad
        # out of place, as selective checkpointing keeps the base GEMM's output.
        y2, down2, up = y.flatten(0, -2), down.flatten(0, -2), b.to(x.dtype).t()
        if torch.is_grad_enabled():
            return torch.addmm(y2, down2, up, alpha=self.scale).view(y.shape)
        return y2.addmm_(down2, up, alpha=self.scale).view(y.shape)

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
        if self.weight_scale is not None:
            raise NotImplementedError("forward_segments needs a bf16/fp32 base; an FP8 base runs through forward")
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
                f"adapters={list(self.lora_A.keys())}, active={self.active_adapter}"
                + ("" if self.weight_scale is None else f", base=fp8 e4m3 (input_grad={self.input_grad})"))


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


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def quantize_base(model: nn.Module, input_grad: str = "bf16") -> int:
    """Every LoRALinear's frozen base -> FP8 (LoRALinear.quantize_base); returns how many were quantised."""
    modules = [m for m in lora_layers(model) if m.weight_scale is None]
    for m in modules:
        m.quantize_base(input_grad)
    return len(modules)


def set_active_adapter(model: nn.Module, name: str | None, layers: list[LoRALinear] | None = None) -> None:
    """Every LoRALinear of ``model`` runs adapter ``name`` (None: the base alone). ``layers``: its LoRALinears listed
    once by the caller; a roll-out switches roles about 10 times per iteration, and walking the module tree each
    time took 7% of a tiny-cpu iteration under cProfile."""
    for module in lora_layers(model) if layers is None else layers:
        module.active_adapter = name


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Qualified name -> parameter for one adapter, in a stable order."""
    return {n: p for n, p in model.named_parameters() if n.endswith(f".lora_A.{name}") or n.endswith(f".lora_B.{name}")}

"""LoRA on a frozen nn.Linear, with several named adapters over one shared base weight.

D-OPSD keeps two adapters with the same config on one frozen DiT: ``student`` (trainable) and ``teacher``
(its EMA, frozen). The base ``weight``/``bias`` keep their original parameter names, so the model's
state-dict keys still equal the checkpoint keys; adapters add ``<name>.lora_A.<adapter>`` [r, in] and
``<name>.lora_B.<adapter>`` [out, r] (PEFT's shapes).

Adapters are fp32 whatever the base's dtype: they are the trainable weights (and the EMA teacher's master), and a
bf16 adapter would round most AdamW updates at lr 1e-4 away. Each forward reads a copy in the base's dtype, so
compute stays in ``model.dtype`` and the gradient reaching the fp32 adapter is the one of that copy.

``forward`` runs the one active adapter (plain torch, what the trainer uses); ``forward_segments`` runs packed
rows whose segments use different adapters (teacher and student rows of a roll-out step) in one call of the
fused op ``dopsd_fast.ops.lora_linear.lora_linear``: one base GEMM, a LoRA term per segment.

Inside ``packed_adapters(plan)`` every LoRALinear takes that path with the plan's segments, so a packed model
forward can mix adapters per sample without passing anything to its linear layers (see ``SampleAdapters``).
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Sequence

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
        plan = _PACKED.get()
        if plan is not None:
            offsets, adapters = plan.segments(x.shape[:-1].numel(), self.adapter_names)
            return self.forward_segments(x, offsets, adapters)
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


class SampleAdapters:
    """Which adapter the rows of each sample of a packed batch use, for one stage of a packed model forward.

    A packed model keeps every sample's rows contiguous in every stage, but the per-sample row counts change from
    stage to stage (image tokens, image + caption tokens, real image tokens only). So the model, not the caller,
    turns per-sample adapter names into row segments: ``stage(lengths)`` once per stage, entered with
    ``packed_adapters`` around the code of that stage. A LoRALinear with T input rows then uses the stage's
    segments when T = sum(lengths), and one row per sample when T is the batch size (adaLN / time-embedding
    linears, were they LoRA targets); any other T is an error, never a silent fall back to the active adapter.
    Runs of samples with the same adapter merge into one segment (teacher samples first: two segments).
    """

    def __init__(self, adapters: Sequence[str | None], device: torch.device, lengths: Sequence[int] | None = None):
        self.adapters = list(adapters)
        self.device = device
        self.lengths = [1] * len(self.adapters) if lengths is None else list(lengths)
        if len(self.lengths) != len(self.adapters):
            raise ValueError(f"{len(self.lengths)} row counts for {len(self.adapters)} samples")
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def stage(self, lengths: Sequence[int]) -> "SampleAdapters":
        return SampleAdapters(self.adapters, self.device, lengths)

    def segments(self, rows: int, adapter_names: list[str]) -> tuple[Tensor, Tensor]:
        """int32 (S+1,) row offsets and int32 (S,) indices into ``adapter_names`` (-1: none) for ``rows`` rows."""
        if rows == sum(self.lengths):
            lengths = self.lengths
        elif rows == len(self.adapters):
            lengths = [1] * rows
        else:
            raise ValueError(f"a LoRA layer got {rows} rows in a packed multi-adapter forward whose current stage has "
                             f"{sum(self.lengths)} rows over {len(self.adapters)} samples: this LoRA target runs "
                             "outside the stages the model declares (use the per-role forwards: "
                             "method.packed_forward=false)")
        key = (rows, tuple(adapter_names))
        if key not in self._cache:      # one host-to-device copy per stage and adapter list, not per layer
            bounds, names = [0], []
            for n, name in zip(lengths, self.adapters):
                if names and names[-1] == name:
                    bounds[-1] += n
                else:
                    names.append(name)
                    bounds.append(bounds[-1] + n)
            index = [-1 if n is None else adapter_names.index(n) for n in names]
            self._cache[key] = (torch.tensor(bounds, dtype=torch.int32).to(self.device),
                                torch.tensor(index, dtype=torch.int32).to(self.device))
        return self._cache[key]


_PACKED: ContextVar[SampleAdapters | None] = ContextVar("dopsd_packed_adapters", default=None)


@contextlib.contextmanager
def packed_adapters(plan: SampleAdapters | None) -> Iterator[None]:
    """Every LoRALinear called inside runs the plan's per-sample adapters (None: each its active adapter).

    A context rather than an argument, so blocks and plain nn.Linear call sites stay unchanged. A model must enter
    it inside any function it hands to gradient checkpointing: the recompute runs during backward, after the
    forward's context has been left.
    """
    token = _PACKED.set(plan)
    try:
        yield
    finally:
        _PACKED.reset(token)


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

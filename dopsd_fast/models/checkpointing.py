"""Activation checkpointing per transformer block: what a block keeps for its backward and what it recomputes.

``model.checkpointing`` (a :class:`CheckpointPlan` on the model):

* ``none``: every block keeps what autograd saves; fastest, most memory.
* ``full``: every block keeps its inputs only and reruns its forward in the backward (one more student forward).
* ``selective``: every block keeps its GEMM and attention outputs and reruns the rest, the norms, RoPE, SwiGLU and
  gates: elementwise work, a few % of the FLOPs (torch's selective activation checkpointing, policy ``keep_policy``).
* ``auto``: full checkpointing on the fewest blocks that fit the memory budget. The first iteration runs fully
  checkpointed and measures what each block would save; ``fit`` then leaves the cheapest blocks unchecked.

The forward maths is the same in every mode (a recompute reruns the same ops on the same values, a saved output is
the value the recompute would return), so outputs and gradients are bitwise equal (tests/models/test_checkpointing.py).
Blocks are numbered in call order by the model (caption path first); without grad (teacher, sampling) nothing is
saved, so nothing is checkpointed.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..ops import packed_attention  # noqa: F401  (defines the dopsd:: op named below)

Mode = Literal["full", "selective", "none", "auto"]
MODES: tuple[str, ...] = typing.get_args(Mode)

_aten = torch.ops.aten
# The policy sees ops below autograd: a linear is mm / addmm there (the position of mat1, mat2 follows), and the
# dopsd:: ops, dispatcher ops too, come whole.
# (an FP8 base, ops/fp8_linear.py, is _scaled_mm on CUDA)
GEMMS = {_aten.mm.default: 0, _aten.addmm.default: 1, _aten.bmm.default: 0, _aten._scaled_mm.default: 0}
# Always kept: every attention (SDPA's backends, ours).
KEPT = {
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.dopsd.packed_attention.default,
}
# A GEMM whose inner dimension K is under 1/16 of its output width N is low rank (a LoRA up-projection): kept, its
# output would be a second (T, N) copy of the linear's (selective then held as much as no checkpointing on a LoRA
# model, measured); recomputed from the kept (T, K) product it costs 2K FLOPs per element, a few % of the base GEMM.
LOW_RANK = 16


def keep_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's choice per op of a block's forward: keep attention and full GEMM outputs."""
    if op in GEMMS:
        mat1, mat2 = args[GEMMS[op]], args[GEMMS[op] + 1]
        low_rank = mat1.shape[-1] * LOW_RANK < mat2.shape[-1]
        return CheckpointPolicy.PREFER_RECOMPUTE if low_rank else CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.MUST_SAVE if op in KEPT else CheckpointPolicy.PREFER_RECOMPUTE


_selective_contexts = functools.partial(create_selective_checkpoint_contexts, keep_policy)


@dataclass
class BlockMemory:
    """What one block costs in activations, measured on its first forward with grad."""

    saved: int   # bytes autograd keeps inside the block (unique storages), its inputs and parameters not counted
    inputs: int  # bytes of its tensor arguments: what a checkpointed block keeps instead


@dataclass
class CheckpointPlan:
    mode: Mode = "none"
    budget: int | None = None                      # auto: bytes the run may use
    checkpointed: frozenset[int] | None = None     # auto: the blocks fit() chose; None while measuring
    blocks: dict[int, BlockMemory] = field(default_factory=dict)   # auto: block index -> its measured memory
    need: int = 0                                  # auto: fit()'s estimate of the bytes the chosen plan uses

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"checkpointing mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "auto" and self.budget is None:
            raise ValueError("checkpointing mode auto needs a memory budget in bytes")

    @property
    def measuring(self) -> bool:
        return self.mode == "auto" and self.checkpointed is None

    def fit(self, resident: int, graphs: int = 1) -> "CheckpointPlan":
        """The plan that leaves the most blocks unchecked (the smallest first) within ``budget``, estimating

            resident + graphs * (inputs of every block + saved of the unchecked ones) + saved of the largest
            checkpointed block (the backward recomputes one at a time)

        ``resident``: bytes held besides activations (weights, gradients, optimizer state, EMA); ``graphs``: student
        graphs alive at once (1 with per-step backward, K without). Activations outside the blocks (embedders, final
        layer, loss) are not counted. If even full checkpointing does not fit, every block is checkpointed."""
        order = sorted(self.blocks, key=lambda i: (self.blocks[i].saved, i))
        saved = [self.blocks[i].saved for i in order]
        floor = resident + graphs * sum(b.inputs for b in self.blocks.values())
        for kept in range(len(order), -1, -1):
            need = floor + graphs * sum(saved[:kept]) + max(saved[kept:], default=0)
            if need <= self.budget:
                break
        return dataclasses.replace(self, checkpointed=frozenset(order[kept:]), need=need)

    def describe(self) -> str:
        """One line on auto's choice: blocks checkpointed, measured MiB per block, estimate and budget."""
        saved = [b.saved / 2**20 for b in self.blocks.values()]
        line = (f"model.checkpointing=auto: {len(self.checkpointed)} of {len(self.blocks)} blocks checkpointed; "
                f"measured {min(saved, default=0):.3g}-{max(saved, default=0):.3g} MiB saved per block; estimate "
                f"{self.need / 2**30:.3g} GiB of a {self.budget / 2**30:.3g} GiB budget")
        if self.need > self.budget:
            line += "; even full checkpointing does not fit: expect out-of-memory, or raise train.memory_budget_gb"
        return line


def run_block(plan: CheckpointPlan, index: int, fn: Callable[..., Tensor], *args):
    """``fn(*args)``, the forward of block ``index``, checkpointed or not as ``plan`` says."""
    if not torch.is_grad_enabled() or plan.mode == "none":
        return fn(*args)
    if plan.mode == "selective":
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_contexts)
    if plan.measuring and index not in plan.blocks:
        plan.blocks[index] = measure_block(fn, args)
    if plan.mode == "full" or plan.measuring or index in plan.checkpointed:
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def measure_block(fn: Callable[..., Tensor], args: tuple) -> BlockMemory:
    """Runs ``fn(*args)`` once unchecked and drops the result (one block's activations, briefly), counting the
    storages autograd saves that are neither parameters nor anything the arguments hold (held anyway)."""
    held = {storage_key(t) for t in _tensors(args, deep=True)}
    held |= {storage_key(p) for m in (fn, *args) if isinstance(m, nn.Module) for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if storage_key(t) not in held:
            saved[storage_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    inputs = {storage_key(t): t.untyped_storage().nbytes() for t in _tensors(args, deep=False)}
    return BlockMemory(saved=sum(saved.values()), inputs=sum(inputs.values()))


def storage_key(t: Tensor) -> int:
    """Which storage ``t`` views: its StorageImpl, so that meta tensors (all at data_ptr 0) count apart too (the
    memory plan traces the model on the meta device, train/memory.py)."""
    return t.untyped_storage()._cdata


def _tensors(obj, deep: bool) -> Iterator[Tensor]:
    """The tensors among ``obj`` and its tuples / lists; ``deep``: also in dataclass fields (layouts, RoPE tables:
    shared by all blocks, so not counted as a block's own input)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item, deep)
    elif deep and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), deep)

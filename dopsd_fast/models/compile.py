"""Regional compilation (``model.compile``): torch.compile on each repeated transformer block.

* ``none``: every block runs eagerly.
* ``blocks``: every block of the model's ``repeated_blocks`` classes runs its forward through torch.compile
  (``nn.Module.compile``, as diffusers' ``compile_repeated_blocks`` does: parameter names and the state dict do not
  change). Inductor fuses the elementwise work around the GEMMs and attention and replaces dozens of Python-dispatched
  kernel launches per block with a few: host overhead is a large share of an iteration at 512^2 (11-13% MFU on an
  H200 with checkpointing, shared/reference/performance.md).

Why blocks and not the whole model: the blocks are where the time goes and they are all alike, so one compilation
serves every instance of a class (parameters are graph inputs, not constants); the code around them (patchify,
packing, the packed layout of models/layout_cache.py, the roll-out and divergence) is shape bookkeeping that would cost
recompilations and graph breaks for little gain. ``dynamic=True``: sizes are symbolic from the first compilation,
since buckets, caption lengths and the two roles' contexts give every forward other token counts; what remains
specialised (batch size, grad mode, whether the input requires grad, modulated or not) costs one compilation each,
~5 per block class in a D-OPSD run.

Composition: ``models/checkpointing.py``'s ``run_block`` calls the block module, so every checkpointing mode wraps
the compiled forward (its recompute in the backward reruns the same compiled code: compiled full checkpointing
equals compiled none bit for bit, tests/models/test_compile.py). Our fused ops are ``torch.library`` custom ops with
fake kernels, so they stay single nodes in the graph. ``fullgraph`` stays off: packed attention over segments of unequal
length on the reference path (CPU; CUDA fp32) reads ``cu_seqlens`` on the host, a deliberate graph break
(ops/packed_attention.py); everything else traces whole (tests/models/test_compile.py counts the breaks).

Numerics: Inductor generates its own kernels for the elementwise and reduction work (fusing, reordering sums), so
losses and gradients equal the eager ones up to fp32 rounding (a few 1e-7 relative), not bit for bit.

CUDA graphs (torch.compile's ``reduce-overhead``, ``model.compile=blocks-cudagraphs``) are not offered. A replay
runs the kernels it recorded, so it could be as exact as ``blocks``, but nothing here could show that it composes:
an iteration interleaves a no-grad teacher forward, a student forward with autograd and a backward per roll-out
step, under checkpointing's saved-tensor hooks, with every block's own parameters (new static addresses per
block), new token counts per bucket (a recording each) and the optimizer and EMA writing the parameters between
replays; CUDA-graph trees then re-record or fall back, or refuse outputs overwritten by a later replay, and which of
these happens needs a GPU to see. Measure ``blocks`` first (bench/pareto.py); graphs are the next step if the host
still shows.
"""
from __future__ import annotations

import typing
import weakref
from collections.abc import Callable
from typing import Literal

from torch import nn

Mode = Literal["none", "blocks"]
MODES: tuple[str, ...] = typing.get_args(Mode)
# block -> the callable nn.Module.compile stored in its _compiled_call_impl, kept here (not on the module, whose
# __getstate__ drops only _compiled_call_impl) so that use_compiled can switch a block off and on again
_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable] = weakref.WeakKeyDictionary()


def compile_blocks(model: nn.Module, mode: Mode = "blocks") -> int:
    """Compile the forward of every ``model.repeated_blocks`` instance in place (``mode="blocks"``); returns how many.

    Lazy: each variant traces on its first call, so LoRA injection may come before or after. Compile every model
    object the roles run (full fine-tuning's teacher is a separate copy).
    """
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return 0
    blocks = [m for m in model.modules() if isinstance(m, model.repeated_blocks)]
    for block in blocks:
        block.compile(dynamic=True)
        _COMPILED[block] = block._compiled_call_impl
    return len(blocks)


def use_compiled(model: nn.Module, on: bool) -> int:
    """Switch every block of ``model`` that ``compile_blocks`` compiled between its compiled forward (``on``) and
    eager, in place; returns how many blocks were switched (0: nothing compiled).

    ``nn.Module.__call__`` runs ``_compiled_call_impl`` when it is set, else the eager ``_call_impl``: switching
    sets or clears that attribute and keeps the compiled callable, so dynamo's caches (on ``_call_impl``'s code,
    shared by all blocks) are not lost and switching back costs no recompilation. For one model object run in
    several configurations (bench/bench_e2e.py); training compiles once and never switches.
    """
    blocks = [m for m in model.modules() if isinstance(m, model.repeated_blocks) and m in _COMPILED]
    for block in blocks:
        block._compiled_call_impl = _COMPILED[block] if on else None
    return len(blocks)


def is_compiled(block: nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None

"""Eager calls of our ops without torch.library's Python dispatch.

A ``torch.library.custom_op`` call spends ~30 µs of host time in eager mode before its body runs (argument checks
against the schema, the dispatcher's Python kernel, autograd's wrapper; ``bench/ops/bench_op_overhead.py``), several
times the launch of the kernel it wraps, and a roll-out of Z-Image calls the block epilogues thousands of times per
iteration: host time is what bounds an iteration at 512² on an H100 (bench/README.md). ``eager_path`` runs the same
forward, setup and backward bodies through a ``torch.autograd.Function`` (~12 µs) when dynamo is not tracing, and
the custom op otherwise, so ``torch.compile`` still sees one opaque node with its fake kernel.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from torch._library.custom_ops import CustomOpDef


def eager_path(op: CustomOpDef, forward: Callable[..., Any], setup_context: Callable[..., None],
               backward: Callable[..., tuple]) -> Callable[..., Any]:
    """``op(*inputs)`` under torch.compile, ``forward(*inputs)`` under no_grad, else an autograd.Function over
    ``forward`` / ``backward``.

    ``forward`` is the op's body, ``setup_context`` and ``backward`` what ``op.register_autograd`` got, except that
    ``backward`` calls the backward body directly (the compiled path keeps the backward custom op)."""
    def forward_(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def backward_(ctx, *grads):
        return backward(ctx, *grads)

    # named after the op (autograd names the backward node when the class is made), so a profile shows e.g.
    # "modulated_rms_normBackward" rather than one "EagerBackward" for every op
    eager = type(op._name, (torch.autograd.Function,),
                 {"forward": staticmethod(forward_), "backward": staticmethod(backward_)})

    def call(*inputs):
        if torch.compiler.is_compiling():
            return op(*inputs)
        if not torch.is_grad_enabled():     # nothing to save or differentiate (the teacher's roll-out): the body alone
            return forward(*inputs)
        return eager.apply(*inputs)

    return call

"""Our fused ops inside other libraries' models, patched in place (the model's module tree, parameter names and
state-dict keys stay untouched, so PEFT adapters, ``load_lora_weights`` and checkpoints keep working).

``dopsd_fast.integrations.diffusers.apply_dopsd_kernels(model)``: diffusers' ``ZImageTransformer2DModel`` and
``Flux2Transformer2DModel``.
Each integration imports its library lazily: importing this package needs neither diffusers nor PEFT.
"""
from __future__ import annotations

__all__ = ["apply_dopsd_kernels"]


def apply_dopsd_kernels(model, **kwargs):
    """See :func:`dopsd_fast.integrations.diffusers.apply_dopsd_kernels`."""
    from .diffusers import apply_dopsd_kernels as apply

    return apply(model, **kwargs)

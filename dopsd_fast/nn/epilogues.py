"""Block epilogue modules (tier 4): the norm weights as parameters, the maths in dopsd_fast.ops.epilogues.

Parameter names follow the norms they replace (``weight`` like z_image.RMSNorm), so a ModulatedRMSNorm or
GatedResidual can stand where ``attention_norm1`` / ``attention_norm2`` stand without changing checkpoint keys.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dopsd_fast.ops.epilogues import gated_residual, modulated_layer_norm, modulated_rms_norm, qk_norm_rope


class ModulatedRMSNorm(nn.Module):
    """``RMSNorm(x) * weight * (1 + scale[sample_index])``; x (T, dim), scale (B, dim)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, scale: Tensor, sample_index: Tensor | None = None) -> Tensor:
        return modulated_rms_norm(x, self.weight, scale, sample_index, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedResidual(nn.Module):
    """``x + tanh(gate[sample_index]) * RMSNorm(a) * weight``; x, a (T, dim), gate (B, dim) before tanh."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, a: Tensor, gate: Tensor, sample_index: Tensor | None = None) -> Tensor:
        return gated_residual(x, a, self.weight, gate, sample_index, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class QKNormRoPE(nn.Module):
    """Per-head RMSNorm of q and k (weights (head_dim,)) then adjacent-pair RoPE; q, k (T, H, head_dim).

    ZImageAttention keeps its ``norm_q.weight`` / ``norm_k.weight`` keys by calling the functional
    ``qk_norm_rope`` with them; this module is for new code.
    """

    def __init__(self, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.q_weight = nn.Parameter(torch.ones(head_dim))
        self.k_weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        return qk_norm_rope(q, k, self.q_weight, self.k_weight, cos, sin, self.eps)

    def extra_repr(self) -> str:
        return f"head_dim={self.q_weight.shape[0]}, eps={self.eps}"


class ModulatedLayerNorm(nn.Module):
    """``LayerNorm(x) * (1 + scale[sample_index]) + shift[sample_index]``, no affine parameters (FLUX.2)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor, shift: Tensor | None, scale: Tensor, sample_index: Tensor | None = None) -> Tensor:
        return modulated_layer_norm(x, shift, scale, sample_index, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

"""Pure-torch reference implementations: the numerical spec of every fused op in dopsd_fast.

Each function here is the ground truth that a fused (Triton/CUDA) kernel is tested against.
They favour clarity over speed and may synchronise with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def equal_segments(total: int, cu_seqlens: Tensor, max_seqlen: int) -> bool:
    """Whether all S segments of a packed buffer have the same length, from shapes alone (no host sync): every
    length is <= the exact max_seqlen, so total == S * max_seqlen means they all equal it."""
    num_segments = cu_seqlens.numel() - 1
    return num_segments > 0 and total == num_segments * max_seqlen


def packed_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
) -> Tensor:
    """Bidirectional attention over packed variable-length segments (flash-attn varlen "THD" layout).

    Args:
        q, k, v: (total_tokens, heads, head_dim), same dtype/device/shape. Segment s holds the rows
            cu_seqlens[s]:cu_seqlens[s+1].
        cu_seqlens: int32 (S+1,), cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == total_tokens.
        max_seqlen: the longest segment length (must be exact: it is used to detect equal lengths).
        softmax_scale: defaults to head_dim ** -0.5.

    Returns:
        (total_tokens, heads, head_dim) in q's dtype. Each token attends to every token of its own
        segment (no causal mask) and to nothing outside it. Computed by torch SDPA in the input dtype.
    """
    total, heads, head_dim = q.shape
    assert k.shape == q.shape and v.shape == q.shape, "q, k, v must share (total_tokens, heads, head_dim)"
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1

    def sdpa(qs: Tensor, ks: Tensor, vs: Tensor) -> Tensor:
        # (N, L, H, D) -> SDPA wants (N, H, L, D)
        out = F.scaled_dot_product_attention(
            qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), scale=softmax_scale
        )
        return out.transpose(1, 2)

    if equal_segments(total, cu_seqlens, max_seqlen):  # one batched call, no host sync
        shape = (cu_seqlens.numel() - 1, max_seqlen, heads, head_dim)
        return sdpa(q.view(shape), k.view(shape), v.view(shape)).reshape(total, heads, head_dim)

    bounds = cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == total, "cu_seqlens must span [0, total_tokens]"
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            outs.append(sdpa(q[None, start:end], k[None, start:end], v[None, start:end])[0])
    return torch.cat(outs, dim=0) if outs else torch.empty_like(q)


def _rollout_segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """(total,) int64: the sample index of every element of a packed buffer (``output_size`` avoids a host sync)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total)


def rollout_step_ref(
    x: Tensor, out_s: Tensor, out_t: Tensor, cu_seqlens: Tensor, step_coef: Tensor, loss_coef: Tensor
) -> tuple[Tensor, Tensor]:
    """One roll-out step on packed samples: Euler update from the student, per-sample squared-error sum.

    Args:
        x, out_s, out_t: (total,) any float dtype; sample b owns [cu_seqlens[b], cu_seqlens[b+1]).
        cu_seqlens: int32 (B+1,), cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == total.
        step_coef: fp32 (B,), sign * (sigma_b - sigma_next_b).
        loss_coef: fp32 (B,), sign * sigma_b for the x0-space loss, 1.0 for the velocity loss.

    Returns:
        x_next: (total,) x.dtype, x + step_coef[b] * out_s computed in fp32, rounded once. No gradient.
        sq_sum: fp32 (B,), sum over segment b of (loss_coef[b] * (out_s - out_t))^2 in fp32. Differentiable in
            out_s only (out_t is the stopped teacher): d sq_sum[b] / d out_s = 2 loss_coef[b]^2 (out_s - out_t).
    """
    seg = _rollout_segment_ids(cu_seqlens, x.numel())
    x_next = (x.detach().float() + step_coef[seg] * out_s.detach().float()).to(x.dtype)
    d = loss_coef[seg] * (out_s.float() - out_t.detach().float())
    sq_sum = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.float32, device=x.device).index_add(0, seg, d * d)
    return x_next, sq_sum


def rollout_step_grad_ref(out_s: Tensor, out_t: Tensor, cu_seqlens: Tensor, loss_coef: Tensor) -> Tensor:
    """The gradient the fused rollout_step writes in its forward: d sq_sum[b] / d out_s, fp32 (total,)."""
    c = loss_coef[_rollout_segment_ids(cu_seqlens, out_s.numel())]
    return 2.0 * c * (c * (out_s.detach().float() - out_t.detach().float()))


@torch.no_grad()
def ema_update_ref(
    teacher: list[Tensor], student: list[Tensor], decay: float, teacher_lowp: list[Tensor] | None = None
) -> None:
    """teacher <- teacher + (1 - decay) * (student - teacher) in place (torch.lerp), then teacher_lowp <- teacher.

    teacher: fp32 tensors (the EMA master); student: same shapes, any float dtype (upcast to fp32 first);
    teacher_lowp: optional same-shape tensors (e.g. the bf16 model weights), overwritten with the new master
    rounded to their dtype. Nothing is differentiable.
    """
    if not teacher:
        return
    src = [s if s.dtype == torch.float32 else s.float() for s in student]
    torch._foreach_lerp_(teacher, src, 1.0 - decay)
    if teacher_lowp:
        torch._foreach_copy_(teacher_lowp, teacher)


def lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: list[Tensor],
    lora_B: list[Tensor],
    scale: float,
    seg_offsets: Tensor,
    seg_adapter: Tensor,
) -> Tensor:
    """A frozen linear layer with a per-segment LoRA adapter over packed rows.

    Args:
        x: (T, in). Segment s holds the rows seg_offsets[s]:seg_offsets[s+1].
        weight: (out, in), bias: (out,) or None, in x's dtype.
        lora_A, lora_B: n_adapters tensors (r, in) and (out, r) (cast to x's dtype).
        seg_offsets: int32 (S+1,), seg_offsets[0] == 0, non-decreasing, seg_offsets[-1] == T.
        seg_adapter: int32 (S,), adapter index of each segment, or -1 for "no adapter".

    Returns:
        (T, out) in x's dtype: Y = X W^T + b, plus scale * (X_s A_a^T) B_a^T on the rows of each segment s
        with adapter a = seg_adapter[s] >= 0 (LoRALinear.forward's formula, in the input dtype).
    """
    y = F.linear(x, weight, bias)
    bounds, adapters = seg_offsets.tolist(), seg_adapter.tolist()
    assert bounds[0] == 0 and bounds[-1] == x.shape[0] and len(bounds) == len(adapters) + 1
    parts = []
    for lo, hi, a in zip(bounds[:-1], bounds[1:], adapters):
        assert hi >= lo and -1 <= a < len(lora_A), "bad segment"
        if a < 0:
            parts.append(y.new_zeros(hi - lo, y.shape[1]))
        else:
            xa = F.linear(x[lo:hi], lora_A[a].to(x.dtype))
            parts.append(scale * F.linear(xa, lora_B[a].to(x.dtype)))
    return y + torch.cat(parts) if parts else y


def lora_linear_bwd_ref(
    dy: Tensor,
    x: Tensor | None,
    weight: Tensor,
    lora_A: list[Tensor],
    lora_B: list[Tensor],
    scale: float,
    seg_offsets: Tensor,
    seg_adapter: Tensor,
    need_dx: bool = True,
    grad_adapters: list[int] = (),
    need_dw: bool = False,
    need_db: bool = False,
) -> tuple[Tensor | None, list[Tensor], list[Tensor], Tensor | None, Tensor | None]:
    """Explicit gradients of lora_linear_ref for dy (T, out), per segment s with adapter a:

        dX_s = dY_s W + scale * (dY_s B_a) A_a,  dB_a += scale * dY_s^T (X_s A_a^T),  dA_a += scale * (dY_s B_a)^T X_s,
        dW = dY^T X,  db = sum_rows dY.

    Returns (dX | None, [dA_a], [dB_a] for a in grad_adapters, dW | None, db | None); x may be None when neither
    grad_adapters nor need_dw asks for it. dA/dB come in lora_A[a]/lora_B[a]'s dtype, the rest in dy's dtype.
    """
    dt = dy.dtype
    acc = torch.promote_types(dt, torch.float32)   # dA/dB sum over segments: fp32 (fp64 for fp64 inputs)
    dx = dy @ weight if need_dx else None
    dA = {a: torch.zeros(lora_A[a].shape, dtype=acc, device=dy.device) for a in grad_adapters}
    dB = {a: torch.zeros(lora_B[a].shape, dtype=acc, device=dy.device) for a in grad_adapters}
    bounds, adapters = seg_offsets.tolist(), seg_adapter.tolist()
    lora_dx = []
    for lo, hi, a in zip(bounds[:-1], bounds[1:], adapters):
        if a < 0:
            lora_dx.append(dy.new_zeros(hi - lo, weight.shape[1]))
            continue
        A, B = lora_A[a].to(dt), lora_B[a].to(dt)
        v = dy[lo:hi] @ B                                   # (n, r)
        lora_dx.append(scale * (v @ A))
        if a in dA:
            dB[a] += scale * (dy[lo:hi].t() @ (x[lo:hi] @ A.t())).to(acc)
            dA[a] += scale * (v.t() @ x[lo:hi]).to(acc)
    if need_dx and lora_dx:
        dx = dx + torch.cat(lora_dx)
    return (dx, [dA[a].to(lora_A[a].dtype) for a in grad_adapters], [dB[a].to(lora_B[a].dtype) for a in grad_adapters],
            dy.t() @ x if need_dw else None, dy.sum(0) if need_db else None)


# ---------------------------------------------------------------------------------------------------------------------
# packed_attention with LSE (separate query / key segments), merge_state, prefix attention


def packed_attention_lse_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Varlen attention returning (O, LSE), computed in fp32: query segment s attends to KV segment s only.

    Args:
        q: (Tq, H, D); k, v: (Tk, H, D); one dtype. cu_seqlens_q / cu_seqlens_k: int32 (S+1,), each starting at 0,
            non-decreasing, ending at Tq / Tk. max_seqlen_q / max_seqlen_k: the exact longest lengths (equal lengths
            are detected from them: one batched computation, no host sync).
        softmax_scale: defaults to D ** -0.5.

    Returns:
        O (Tq, H, D) in q's dtype (fp32 math, rounded once; fp64 inputs stay fp64) and LSE fp32 (fp64) (H, Tq)
        = logsumexp_j(scale * q . k_j) in natural-log units (flash-attn varlen's softmax_lse layout). A query whose KV segment is empty gets O = 0 and
        LSE = -inf. Differentiable w.r.t. q, k, v through both outputs.
    """
    tq, heads, head_dim = q.shape
    tk = k.shape[0]
    assert k.shape == v.shape and k.shape[1:] == q.shape[1:], "k, v must be (Tk, H, D) with q's H and D"
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert cu_seqlens_q.shape == cu_seqlens_k.shape and cu_seqlens_q.dim() == 1
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    num_segments = cu_seqlens_q.numel() - 1
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 math (fp64 stays fp64: test gold)

    def attend(qs: Tensor, ks: Tensor, vs: Tensor) -> tuple[Tensor, Tensor]:
        # (N, Lq, H, D), (N, Lk, H, D) -> O (N, Lq, H, D), LSE (N, H, Lq), both in acc
        if ks.shape[1] == 0:
            lse = qs.new_full((qs.shape[0], heads, qs.shape[1]), float("-inf"), dtype=acc)
            return qs.new_zeros(qs.shape, dtype=acc), lse
        s = torch.einsum("nqhd,nkhd->nhqk", qs.to(acc), ks.to(acc)) * scale
        lse = torch.logsumexp(s, dim=-1)
        return torch.einsum("nhqk,nkhd->nqhd", torch.exp(s - lse[..., None]), vs.to(acc)), lse

    if equal_segments(tq, cu_seqlens_q, max_seqlen_q) and equal_segments(tk, cu_seqlens_k, max_seqlen_k):
        out, lse = attend(q.reshape(num_segments, max_seqlen_q, heads, head_dim),
                          k.reshape(num_segments, max_seqlen_k, heads, head_dim),
                          v.reshape(num_segments, max_seqlen_k, heads, head_dim))
        return out.reshape(tq, heads, head_dim).to(q.dtype), lse.permute(1, 0, 2).reshape(heads, tq)

    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert bq[0] == 0 and bq[-1] == tq and bk[0] == 0 and bk[-1] == tk, "cu_seqlens must span [0, T]"
    outs, lses = [], []
    for q0, q1, k0, k1 in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        if q1 > q0:
            o, lse = attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1])
            outs.append(o[0])
            lses.append(lse[0])
    if not outs:
        return torch.zeros_like(q), q.new_full((heads, tq), float("-inf"), dtype=acc)
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1)


def merge_state_ref(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attention states over disjoint key sets into the state over their union.

    Args:
        o1, o2: (T, H, D), one dtype. lse1, lse2: fp32 (H, T), natural-log units (-inf = no keys).

    Returns:
        (O (T, H, D) in o1's dtype, LSE fp32 (H, T)): LSE = logaddexp(lse1, lse2), w_i = exp(lse_i - LSE),
        O = w1 * o1 + w2 * o2 (fp32 math). Rows with both LSE_i = -inf give O = 0, LSE = -inf and zero gradients.
        Differentiable w.r.t. o1, lse1, o2, lse2 (the explicit backward is merge_state_bwd_ref).
    """
    m = torch.maximum(lse1, lse2)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # both empty: keep the shift finite
    e1, e2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    s = e1 + e2
    nonempty = s > 0
    s_safe = torch.where(nonempty, s, torch.ones_like(s))
    lse = torch.where(nonempty, m + torch.log(s_safe), torch.full_like(s, float("-inf")))
    w1 = (e1 / s_safe).t()[..., None]  # (T, H, 1)
    w2 = (e2 / s_safe).t()[..., None]
    acc = torch.promote_types(o1.dtype, torch.float32)  # fp32 math (fp64 stays fp64 for gradcheck)
    return (w1 * o1.to(acc) + w2 * o2.to(acc)).to(o1.dtype), lse


def merge_state_bwd_ref(
    dout: Tensor, dlse: Tensor | None, o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Explicit backward of merge_state_ref: (dO1, dLSE1, dO2, dLSE2) from dO (T, H, D) and dLSE fp32 (H, T) or None.

    With w_i = exp(lse_i - LSE) (dw_i/dlse_j = w_i (delta_ij - w_j)), g_i = rowsum(dO * O_i), g = rowsum(dO * O):
        dO_i = w_i dO;   dLSE_i = w_i (g_i - g) + w_i dLSE.
    fp32 math (fp64 inputs stay fp64); dO_i in o_i's dtype, dLSE_i in lse's dtype.
    """
    m = torch.maximum(lse1, lse2)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e1, e2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    s = e1 + e2
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    w1, w2 = e1 / s_safe, e2 / s_safe  # (H, T)
    acc = torch.promote_types(o1.dtype, torch.float32)  # fp32 math (fp64 stays fp64)
    do = dout.to(acc)
    g1 = (do * o1.to(acc)).sum(-1).t()  # (H, T)
    g2 = (do * o2.to(acc)).sum(-1).t()
    g = w1 * g1 + w2 * g2
    if dlse is not None:
        g = g - dlse.to(acc)
    do1 = (w1.t()[..., None] * do).to(o1.dtype)
    do2 = (w2.t()[..., None] * do).to(o2.dtype)
    return do1, (w1 * (g1 - g)).to(lse1.dtype), do2, (w2 * (g2 - g)).to(lse2.dtype)


def prefix_attention_ref(
    q: Tensor,
    k_prefix: Tensor,
    v_prefix: Tensor,
    k_suffix: Tensor,
    v_suffix: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_suffix: Tensor,
    softmax_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Each query segment attends to concat(shared prefix KV, its own suffix KV): plain attention, fp32 math.

    Args:
        q: (Tq, H, D) packed query segments, cu_seqlens_q int32 (S+1,).
        k_prefix, v_prefix: (P, H, D), one KV prefix seen by every query segment (P >= 1).
        k_suffix, v_suffix: (Tk, H, D) packed per-segment suffixes, cu_seqlens_suffix int32 (S+1,) (lengths may be 0).

    Returns:
        (O (Tq, H, D) in q's dtype, LSE fp32 (H, Tq)); the oracle of dopsd_fast.ops.packed_attention.prefix_attention.
    """
    p = k_prefix.shape[0]
    bq, bs = cu_seqlens_q.tolist(), cu_seqlens_suffix.tolist()
    ks, vs, bounds = [], [], [0]
    for s0, s1 in zip(bs[:-1], bs[1:]):
        ks += [k_prefix, k_suffix[s0:s1]]
        vs += [v_prefix, v_suffix[s0:s1]]
        bounds.append(bounds[-1] + p + s1 - s0)
    cu_k = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    max_q = max(b - a for a, b in zip(bq[:-1], bq[1:]))
    return packed_attention_lse_ref(q, torch.cat(ks), torch.cat(vs), cu_seqlens_q, cu_k, max_q,
                                    max(b - a for a, b in zip(bounds[:-1], bounds[1:])), softmax_scale)


# ------------------------------------------------------------------------------------------------------------------
# Block epilogues (dopsd_fast/ops/epilogues.py): the maths of z_image.py's RMSNorm / apply_rope / ZImageBlock and of
# FLUX.2's modulated LayerNorm, rounding where the model rounds. Packed tokens (T, D); per-sample modulation (B, D)
# picked per token by int64 sample_index (T,) (B == 1: one row broadcast to every token, sample_index unused).
def rms_norm_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Output dtype of z_image.RMSNorm: the weight's when it is fp16/bf16 (the fp32 result is cast to it before
    the weight product), else fp32 promoted with the weight (so a bf16 input with an fp32 weight gives fp32)."""
    if weight_dtype in (torch.float16, torch.bfloat16):
        return weight_dtype
    return torch.promote_types(torch.float32, weight_dtype)


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm with diffusers' numerics (z_image.RMSNorm): statistics in fp32, cast to a half weight's dtype,
    then the weight product."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return y * weight


def _ep_per_token(values: Tensor, sample_index: Tensor | None) -> Tensor:
    # z_image.per_token: (B, D) -> (T, D), or the (1, D) row itself when B == 1.
    return values if values.shape[0] == 1 else values[sample_index]


def _ep_per_sample_sum(c: Tensor, sample_index: Tensor | None, num_samples: int) -> Tensor:
    # Adjoint of _ep_per_token: (T, D) -> (B, D) sums over each sample's tokens.
    if num_samples == 1:
        return c.sum(0, keepdim=True)
    return c.new_zeros(num_samples, c.shape[-1]).index_add_(0, sample_index, c)


def _ep_rms_norm_dx(g: Tensor, xf: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # g = dL/dxhat (fp32, (..., D)) -> (dL/dx, xhat) for xhat = x * rsqrt(mean(x^2) + eps).
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True)), xhat


def modulated_rms_norm_ref(x: Tensor, weight: Tensor, scale: Tensor, sample_index: Tensor | None, eps: float) -> Tensor:
    """RMSNorm(x) * weight * (1 + scale[sample_index]): ZImageBlock's `attention_norm1(x) * scale_msa`.

    x (T, D) any float dtype; weight (D,); scale (B, D) raw adaLN output; sample_index int64 (T,) (unused if B == 1).
    Returns (T, D) in promote(rms_norm_dtype(weight.dtype), scale.dtype).
    """
    return rms_norm_ref(x, weight, eps) * (1.0 + _ep_per_token(scale, sample_index))


def modulated_rms_norm_backward_ref(grad: Tensor, x: Tensor, weight: Tensor, scale: Tensor,
                                    sample_index: Tensor | None, eps: float, *, need_weight: bool = True,
                                    need_scale: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """fp32 gradients of modulated_rms_norm_ref -> (dx in x.dtype, dweight in weight.dtype, dscale in scale.dtype);
    dweight / dscale are None (not computed) when ``need_weight`` / ``need_scale`` is False (frozen in LoRA)."""
    dy, xf, w = grad.float(), x.float(), weight.float()
    mod = 1.0 + _ep_per_token(scale.float(), sample_index)
    dx, xhat = _ep_rms_norm_dx(dy * w * mod, xf, eps)
    dweight = (dy * mod * xhat).sum(0).to(weight.dtype) if need_weight else None
    dscale = (_ep_per_sample_sum(dy * xhat * w, sample_index, scale.shape[0]).to(scale.dtype) if need_scale
              else None)
    return dx.to(x.dtype), dweight, dscale


def gated_residual_ref(x: Tensor, a: Tensor, weight: Tensor, gate: Tensor, sample_index: Tensor | None,
                       eps: float) -> Tensor:
    """x + tanh(gate[sample_index]) * RMSNorm(a) * weight: ZImageBlock's `x + gate_msa.tanh() * attention_norm2(a)`.

    x, a (T, D); weight (D,); gate (B, D) raw adaLN output (the tanh is part of the op); sample_index int64 (T,).
    Returns (T, D) in promote(x.dtype, gate.dtype, rms_norm_dtype(weight.dtype)).
    """
    return x + _ep_per_token(gate, sample_index).tanh() * rms_norm_ref(a, weight, eps)


def gated_residual_backward_ref(grad: Tensor, x: Tensor, a: Tensor, weight: Tensor, gate: Tensor,
                                sample_index: Tensor | None, eps: float, *, need_weight: bool = True,
                                need_gate: bool = True) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """fp32 gradients of gated_residual_ref -> (dx, da, dweight, dgate), each in its input's dtype;
    dweight / dgate are None (not computed) when ``need_weight`` / ``need_gate`` is False (frozen in LoRA)."""
    dy, af, w = grad.float(), a.float(), weight.float()
    tg = _ep_per_token(gate.float(), sample_index).tanh()
    da, ahat = _ep_rms_norm_dx(dy * tg * w, af, eps)
    dweight = (dy * tg * ahat).sum(0).to(weight.dtype) if need_weight else None
    dgate = None
    if need_gate:
        dgate = _ep_per_sample_sum(dy * ahat * w, sample_index, gate.shape[0]) * (1.0 - gate.float().tanh() ** 2)
        dgate = dgate.to(gate.dtype)
    return grad.to(x.dtype), da.to(a.dtype), dweight, dgate


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # (T, H, D) -> fp32 (T, H, D): each adjacent pair (2i, 2i+1) as re + i*im times cos + i*sin. One complex multiply,
    # as diffusers' Z-Image RoPE does it: the same fp32 products as stacking (re*cos - im*sin, re*sin + im*cos) on the
    # last dim, which took 7x the CPU time and made the patched diffusers model 8% slower than unpatched on CPU
    # (bench/results/2026-12-05-cpu-patched-baseline/profile.json).
    pairs = x.float().unflatten(-1, (-1, 2))
    try:
        pairs = torch.view_as_complex(pairs)
    except RuntimeError:      # an odd stride or offset (a view into an odd-width fused projection): copy first
        pairs = torch.view_as_complex(pairs.contiguous())
    return torch.view_as_real(pairs * torch.complex(cos, sin)[:, None]).flatten(-2)


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on adjacent pairs (2i, 2i+1) of x (T, H, D), rotated in fp32, returned in x.dtype; cos/sin (T, D/2)."""
    return _rotate_pairs(x, cos, sin).to(x.dtype)


def qk_norm_rope_ref(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm then RoPE on adjacent pairs: ZImageAttention's `apply_rope(norm_q(q))`, same for k.

    q (T, Hq, hd), k (T, Hk, hd); q_weight, k_weight (hd,); cos, sin fp32 (T, hd/2). Returns (q', k') in
    rms_norm_dtype(q_weight.dtype) / rms_norm_dtype(k_weight.dtype) (apply_rope keeps the norm's output dtype).
    """
    return (rope_ref(rms_norm_ref(q, q_weight, eps), cos, sin),
            rope_ref(rms_norm_ref(k, k_weight, eps), cos, sin))


def _ep_norm_rope_backward(grad: Tensor, x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor,
                           eps: float, need_weight: bool) -> tuple[Tensor, Tensor | None]:
    dn = _rotate_pairs(grad, cos, -sin)  # inverse rotation
    dx, xhat = _ep_rms_norm_dx(dn * weight.float(), x.float(), eps)
    return dx.to(x.dtype), (dn * xhat).sum((0, 1)).to(weight.dtype) if need_weight else None


def qk_norm_rope_backward_ref(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, q_weight: Tensor,
                              k_weight: Tensor, cos: Tensor, sin: Tensor, eps: float, *,
                              need_weight: bool = True) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """fp32 gradients of qk_norm_rope_ref -> (dq, dk, dq_weight, dk_weight) in the inputs' dtypes; cos/sin get none.
    dq_weight / dk_weight are None (not computed) when ``need_weight`` is False (frozen norm weights in LoRA)."""
    dq, dqw = _ep_norm_rope_backward(grad_q, q, q_weight, cos, sin, eps, need_weight)
    dk, dkw = _ep_norm_rope_backward(grad_k, k, k_weight, cos, sin, eps, need_weight)
    return dq, dk, dqw, dkw


def modulated_layer_norm_ref(x: Tensor, shift: Tensor | None, scale: Tensor, sample_index: Tensor | None,
                             eps: float = 1e-6) -> Tensor:
    """LayerNorm(x, no affine) * (1 + scale[sample_index]) + shift[sample_index]: FLUX.2's `(1 + scale) * LN(x) + shift`
    (shift None: Z-Image's final layer `LN(x) * (1 + scale)`).

    x (T, D); shift None or (B, D); scale (B, D); sample_index int64 (T,) (unused if B == 1). LayerNorm runs in
    x's dtype (F.layer_norm: fp32 statistics, rounded to x.dtype). Returns (T, D) in promote(x, scale, shift) dtypes.
    """
    y = F.layer_norm(x, x.shape[-1:], eps=eps) * (1.0 + _ep_per_token(scale, sample_index))
    return y if shift is None else y + _ep_per_token(shift, sample_index)


def modulated_layer_norm_backward_ref(grad: Tensor, x: Tensor, shift: Tensor | None, scale: Tensor,
                                      sample_index: Tensor | None,
                                      eps: float = 1e-6, *, need_scale: bool = True,
                                      need_shift: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """fp32 gradients of modulated_layer_norm_ref -> (dx, dshift, dscale) in the inputs' dtypes; dshift is None
    when shift is None or ``need_shift`` is False, dscale None when ``need_scale`` is False (not computed)."""
    dy, xf = grad.float(), x.float()
    xc = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    g = dy * (1.0 + _ep_per_token(scale.float(), sample_index))
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dscale = _ep_per_sample_sum(dy * xhat, sample_index, scale.shape[0]).to(scale.dtype) if need_scale else None
    dshift = (_ep_per_sample_sum(dy, sample_index, shift.shape[0]).to(shift.dtype)
              if shift is not None and need_shift else None)
    return dx.to(x.dtype), dshift, dscale


# The epilogue family, op name -> (forward spec, backward spec); benches and tests iterate it.
epilogues_ref = {
    "modulated_rms_norm": (modulated_rms_norm_ref, modulated_rms_norm_backward_ref),
    "gated_residual": (gated_residual_ref, gated_residual_backward_ref),
    "qk_norm_rope": (qk_norm_rope_ref, qk_norm_rope_backward_ref),
    "modulated_layer_norm": (modulated_layer_norm_ref, modulated_layer_norm_backward_ref),
}


def packed_attention_lse_bwd_ref(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    softmax_scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Explicit backward of packed_attention_lse_ref: (dQ, dK, dV) in q/k/v's dtypes from dO (Tq, H, D) and dLSE
    (H, Tq) or None (= zeros); lse is the forward's LSE. fp32 math (fp64 stays fp64), one host sync.

    Per segment with P = exp(scale * Q K^T - LSE), O = P V (recomputed), delta = rowsum(dO * O) - dLSE:
        dV = P^T dO,  dS = P * (dO V^T - delta),  dQ = scale * dS K,  dK = scale * dS^T Q.
    """
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    acc = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for q0, q1, k0, k1 in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        if q1 == q0 or k1 == k0:
            continue
        qs, dos = q[q0:q1].to(acc).transpose(0, 1), dout[q0:q1].to(acc).transpose(0, 1)  # (H, Lq, D)
        ks, vs = k[k0:k1].to(acc).transpose(0, 1), v[k0:k1].to(acc).transpose(0, 1)  # (H, Lk, D)
        p = torch.exp(qs @ ks.transpose(1, 2) * scale - lse[:, q0:q1, None].to(acc))  # (H, Lq, Lk)
        delta = (dos * (p @ vs)).sum(-1)
        if dlse is not None:
            delta = delta - dlse[:, q0:q1].to(acc)
        ds = p * (dos @ vs.transpose(1, 2) - delta[..., None])
        dv[k0:k1] = (p.transpose(1, 2) @ dos).transpose(0, 1)
        dq[q0:q1] = scale * (ds @ ks).transpose(0, 1)
        dk[k0:k1] = scale * (ds.transpose(1, 2) @ qs).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# Largest finite magnitudes of the two FP8 formats (OCP FP8: e4m3fn has no infinities, e5m2 is IEEE-like).
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantize_rowwise(t: Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """FP8 values and one fp32 scale per row: ``t ~= q * scale[..., None]``, scale = row amax / FP8 max.

    t: (..., n) any float dtype; returns q (..., n) ``dtype`` and scale (...,) fp32. The row's largest magnitude
    maps to the format's largest finite value; rounding is the cast's round-to-nearest-even, saturating (the clamp:
    an fp32 quotient a hair above the max would otherwise become NaN in e4m3fn). A zero row gets scale 1 (all-zero
    q, no 0/0). This one function quantises on every device, so the CUDA path and the CPU emulation round alike.
    """
    fmax = FP8_MAX[dtype]
    amax = t.abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    q = (t.float() / scale.unsqueeze(-1)).clamp(-fmax, fmax).to(dtype)
    return q, scale


def dequantize_rowwise(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``q * scale[..., None]`` in fp32, rounded once to ``dtype``."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def fp8_linear_ref(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """A linear layer on an e4m3 weight, emulated: what ``torch._scaled_mm`` computes, in fp32 on any device.

    x: (T, in) any float dtype, quantised per row to e4m3 here (quantize_rowwise); weight: (out, in) e4m3 with
    weight_scale (out,) fp32 (quantize_rowwise of the original weight); bias: (out,) or None. Returns (T, out) in
    x's dtype: (Xq Wq^T) * sx sw^T + b. The FP8 products are exact in fp32 and the scales multiply the fp32 sums,
    as the GPU kernel applies them after its fp32 accumulation; only the summation order differs from it.
    """
    xq, x_scale = quantize_rowwise(x)
    y = (xq.float() @ weight.float().t()) * x_scale.unsqueeze(-1) * weight_scale
    return (y if bias is None else y + bias.float()).to(x.dtype)


def fp8_linear_input_grad_ref(dy: Tensor, weight: Tensor, weight_scale: Tensor, grad_dtype: str = "bf16") -> Tensor:
    """dX = dY W for the dequantised weight W = Wq * sw[:, None]; dy (T, out) -> (T, in) in dy's dtype.

    grad_dtype "bf16": the GEMM in dy's dtype on the dequantised weight (rounded once to that dtype). "e5m2": W's row
    scales move onto dY's columns (they lie along this GEMM's reduction dimension, where a row-wise scaled FP8 GEMM
    cannot apply them), dY * sw is quantised per row to e5m2 and multiplied with the unscaled e4m3 weight in fp32.
    """
    if grad_dtype == "bf16":
        return dy @ dequantize_rowwise(weight, weight_scale, dy.dtype)
    gq, g_scale = quantize_rowwise(dy.float() * weight_scale, torch.float8_e5m2)
    return ((gq.float() @ weight.float()) * g_scale.unsqueeze(-1)).to(dy.dtype)

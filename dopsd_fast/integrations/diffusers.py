"""Our block epilogues and attention inside diffusers' own transformers, patched in place.

``apply_dopsd_kernels(model)`` replaces the ``forward`` of every transformer block of a diffusers
``ZImageTransformer2DModel`` or ``Flux2Transformer2DModel`` (an instance attribute: the class, the module tree,
parameter names and state-dict keys are untouched; ``remove()`` deletes the attribute again). Z-Image blocks run

    attention_norm1(x) * (1 + scale_msa)               -> ops.epilogues.modulated_rms_norm (raw adaLN scale)
    x + tanh(gate_msa) * attention_norm2(attn_out)     -> ops.epilogues.gated_residual     (raw adaLN gate)
    rope(norm_q(q)), rope(norm_k(k))                   -> ops.epilogues.qk_norm_rope       (fp32 cos / sin)
    SDPA(q, k, v, key mask)                            -> diffusers' dispatch (``"sdpa"``) or ops.packed_attention

and the same for the FFN half. FLUX.2 blocks (double and single stream) run ``(1 + scale) * LN(x) + shift`` as
ops.epilogues.modulated_layer_norm and the per-stream QK RMSNorm + RoPE as qk_norm_rope; their raw-gate residuals
``x + gate * a`` have no norm to fuse and stay diffusers' arithmetic.

Conventions converted here: diffusers adds the 1 to the scales and applies tanh to the gates before the products,
our ops take the raw adaLN chunks (B, D) and pick each token's row through ``sample_index``. Z-Image's RoPE is a
complex table ``freqs_cis`` (B, L, head_dim/2) on adjacent pairs: its real / imaginary parts are our fp32 cos / sin
(T, head_dim/2). FLUX.2's is a real (cos, sin) pair (S, head_dim) with each value repeated for its pair: every other
column, tiled over the batch. Each table is converted once (the blocks of a forward share it). Every projection is
called as a module (``attn.to_q(h)``, ``block.feed_forward(h)``, ``block.adaLN_modulation(t)``), never through its
``.weight``, so PEFT LoRA layers on any of them work unchanged; only norm weights (no LoRA target) are read.
Calls outside the plain text-to-image path (FLUX.2's KV-cache modes and per-token blended modulation) run
diffusers' own forward.

Parity (tests/integrations/test_diffusers_patch.py): fp32 forward and every parameter / LoRA gradient equal the
unpatched model to 1e-5, with and without gradient checkpointing, on the reference, Triton (interpreter) and cpp
backends; bf16 within 2x diffusers' own bf16 error against fp32 (our ops round once where diffusers rounds after
every elementwise step).
"""
from __future__ import annotations

import re
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from torch import Tensor

from dopsd_fast._extras import require
from dopsd_fast.ops.epilogues import gated_residual, modulated_layer_norm, modulated_rms_norm, qk_norm_rope
from dopsd_fast.ops.packed_attention import packed_attention, packed_attention_with_lse

__all__ = ["apply_dopsd_kernels", "DopsdPatch", "SUPPORTED_CLASSES", "TESTED_DIFFUSERS"]

# diffusers versions whose block code the patched forwards were checked against (tests/integrations): [min, max).
# The block forwards below restate diffusers' maths, so a version outside this range is refused rather than guessed.
TESTED_DIFFUSERS = ("0.42.0", "0.43.0")
SUPPORTED_CLASSES = ("ZImageTransformer2DModel", "Flux2Transformer2DModel")
Attention = Literal["sdpa", "dopsd"]

_PATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass
class DopsdPatch:
    """What ``apply_dopsd_kernels`` changed; ``remove()`` restores every original forward (also as a context
    manager: ``with apply_dopsd_kernels(model): ...``)."""

    model: nn.Module
    attention: str
    epilogues: bool
    blocks: list[nn.Module] = field(default_factory=list)
    _removed: bool = False

    def remove(self) -> None:
        if self._removed:
            return
        for block in self.blocks:
            block.__dict__.pop("forward", None)     # the class's forward shows through again
        _PATCHED.discard(self.model)
        self._removed = True

    def __enter__(self) -> "DopsdPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self.blocks)} blocks"
        return (f"DopsdPatch({type(self.model).__name__}, attention={self.attention!r}, epilogues={self.epilogues}, "
                f"{state})")


def _version(text: str) -> tuple[int, ...]:
    """"0.42.1" / "0.43.0.dev0" -> (0, 42, 1) / (0, 43, 0): the release numbers, suffixes dropped."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise ValueError(f"cannot read the diffusers version {text!r}")
    return tuple(int(part or 0) for part in match.groups())


def _check_version(allow_untested: bool) -> None:
    diffusers = require("diffusers", "diffusers", "apply_dopsd_kernels")
    low, high = TESTED_DIFFUSERS
    if not (_version(low) <= _version(diffusers.__version__) < _version(high)) and not allow_untested:
        raise ValueError(f"apply_dopsd_kernels supports diffusers >={low},<{high} (tested); this is diffusers "
                         f"{diffusers.__version__}. Its block code may differ: install a tested version, or pass "
                         "allow_untested_version=True and run tests/integrations/test_diffusers_patch.py first")


def apply_dopsd_kernels(model: nn.Module, *, attention: Attention = "sdpa", epilogues: bool = True,
                        allow_untested_version: bool = False) -> DopsdPatch:
    """Run our fused block epilogues (and optionally our attention) inside a diffusers transformer, in place.

    Args:
        model: a diffusers ``ZImageTransformer2DModel`` or ``Flux2Transformer2DModel`` (FLUX.2 [klein]). PEFT
            adapters added with ``add_adapter`` / ``load_lora_adapter`` / ``load_lora_weights`` before or after
            patching are fine; a ``peft.PeftModel`` is unwrapped. Any dtype and device; gradient checkpointing
            (``enable_gradient_checkpointing``), ``copy.deepcopy`` and ``torch.compile`` of the patched model work.
        attention: ``"sdpa"`` (default) keeps diffusers' attention dispatch (torch SDPA unless
            ``set_attention_backend`` chose another backend); ``"dopsd"`` runs ``ops.packed_attention`` (the batch as
            packed equal segments; with a key-padding mask, ``packed_attention_with_lse`` over the valid keys of
            each sample, which reads the mask on the host: one sync per layer).
        epilogues: replace the modulated norms (Z-Image RMSNorm, FLUX.2 LayerNorm), Z-Image's gated RMSNorm
            residuals and the QK-norm + RoPE by our ops (default True); False swaps the attention alone.
        allow_untested_version: patch a diffusers version outside ``TESTED_DIFFUSERS`` anyway.

    Returns a :class:`DopsdPatch`; ``handle.remove()`` restores the original forwards (bitwise-identical outputs).
    The op backend follows ``dopsd_fast.use_backend`` / ``DOPSD_BACKEND`` at call time, as in our own models.

    Raises ValueError for another model class (``SUPPORTED_CLASSES``), an untested diffusers version, an
    attention processor other than diffusers' default one, or a model that is already patched.
    """
    if attention not in ("sdpa", "dopsd"):
        raise ValueError(f"attention={attention!r}: expected 'sdpa' or 'dopsd'")
    if hasattr(model, "get_base_model") and callable(model.get_base_model):   # peft.PeftModel wrapping the model
        model = model.get_base_model()
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES or not type(model).__module__.startswith("diffusers."):
        raise ValueError(f"apply_dopsd_kernels supports diffusers' {', '.join(SUPPORTED_CLASSES)}; got "
                         f"{type(model).__module__}.{name}")
    _check_version(allow_untested_version)
    if model in _PATCHED:
        raise ValueError(f"this {name} is already patched: call remove() on its DopsdPatch first")

    handle = DopsdPatch(model, attention, epilogues)
    if name == "ZImageTransformer2DModel":
        from diffusers.models.transformers import transformer_z_image as dz

        blocks = [(m, _zimage_block_forward) for m in model.modules() if isinstance(m, dz.ZImageTransformerBlock)]
        for block, _ in blocks:
            _check_zimage_block(block, dz)
    else:
        from diffusers.models.transformers import transformer_flux2 as df

        blocks = [(m, _flux2_double_forward if isinstance(m, df.Flux2TransformerBlock) else _flux2_single_forward)
                  for m in model.modules() if isinstance(m, (df.Flux2TransformerBlock, df.Flux2SingleTransformerBlock))]
        for block, _ in blocks:
            _check_flux2_block(block, df)
    rope = _CosSin()
    for block, fn in blocks:
        block.forward = _bind(fn, block, rope=rope, attention=attention, epilogues=epilogues)
        handle.blocks.append(block)
    _PATCHED.add(model)
    return handle


def _bind(fn: Callable[..., Tensor], block: nn.Module, **options: Any) -> Callable[..., Tensor]:
    """``fn`` as ``block``'s forward. A bound method, not a closure over ``block``: ``copy.deepcopy`` of the model
    (an EMA copy) rebinds it to the copied block, where a closure would keep running the original's weights."""
    def forward(self, *args, **kwargs):
        return fn(self, *args, **options, **kwargs)

    forward.__doc__ = f"dopsd_fast patched forward of {type(block).__name__} (see dopsd_fast.integrations.diffusers)"
    return types.MethodType(forward, block)


def _check_zimage_block(block: nn.Module, dz: types.ModuleType) -> None:
    norms = [block.attention_norm1, block.attention_norm2, block.ffn_norm1, block.ffn_norm2]
    attn = block.attention
    if attn.norm_q is not None:
        norms += [attn.norm_q, attn.norm_k]
    for norm in norms:
        if norm.weight is None or getattr(norm, "bias", None) is not None:
            raise ValueError(f"{type(norm).__name__} without a weight or with a bias: not Z-Image's RMSNorm")
    if type(attn.processor) is not dz.ZSingleStreamAttnProcessor:
        raise ValueError(f"attention processor {type(attn.processor).__name__}: apply_dopsd_kernels replaces "
                         "ZSingleStreamAttnProcessor's maths only; restore it with set_attn_processor first")
    if "forward" in block.__dict__:
        raise ValueError(f"{type(block).__name__} already has an instance-level forward (another patch or hook)")


class _CosSin:
    """fp32 cos, sin (T, head_dim/2) for qk_norm_rope from diffusers' RoPE tables, kept for the last table seen: the
    blocks of one forward (and a checkpointed recompute) pass the same tensor object, so it is converted once per
    forward. Under torch.compile the conversion is traced instead (no Python-side state in the graph).

    Z-Image: a complex freqs_cis (B, L, head_dim/2) -> its real / imaginary parts, T = B*L.
    FLUX.2: (cos, sin) (S, head_dim), each value repeated for its adjacent pair -> every other column, tiled over the
    batch, T = B*S."""

    def __init__(self):
        self._key: tuple | None = None
        self._cos_sin: tuple[Tensor, Tensor] | None = None

    def _cached(self, table: Tensor, extra: int, build: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            return build()
        if self._key is not None and self._key[0]() is table and self._key[1:] == (table._version, extra):
            return self._cos_sin
        self._cos_sin = build()
        self._key = (weakref.ref(table), table._version, extra)
        return self._cos_sin

    def __call__(self, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
        def build():
            pairs = torch.view_as_real(freqs_cis).reshape(-1, freqs_cis.shape[-1], 2).float()  # (B*L, hd/2, [re, im])
            return pairs[..., 0].contiguous(), pairs[..., 1].contiguous()

        return self._cached(freqs_cis, 0, build)

    def real(self, cos: Tensor, sin: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        def build():
            return tuple(t[:, 0::2].float().repeat(batch, 1).contiguous() for t in (cos, sin))

        return self._cached(cos, batch, build)


def _zimage_block_forward(block: nn.Module, x: Tensor, attn_mask: Tensor | None, freqs_cis: Tensor | None,
                          adaln_input: Tensor | None = None, noise_mask: Tensor | None = None,
                          adaln_noisy: Tensor | None = None, adaln_clean: Tensor | None = None, *,
                          rope: _CosSin, attention: str, epilogues: bool) -> Tensor:
    """ZImageTransformerBlock.forward (diffusers 0.42) on our ops. x: (B, L, D); attn_mask: bool (B, L) key mask or
    None; freqs_cis: complex64 (B, L, head_dim/2) or None; adaln_input: (B, 256); omni mode: noise_mask (B, L) with
    1 = noisy token, adaln_noisy / adaln_clean (B, 256)."""
    batch, seq, dim = x.shape
    cos_sin = rope(freqs_cis) if (freqs_cis is not None and epilogues) else None

    def attend(h: Tensor) -> Tensor:     # (B, L, D) -> (B, L, D)
        return _zimage_attention(block.attention, h, attn_mask, freqs_cis, cos_sin, attention)

    if not block.modulation:          # context / siglip refiners: plain sandwich norms, no gate
        x = x + block.attention_norm2(attend(block.attention_norm1(x)))
        return x + block.ffn_norm2(block.feed_forward(block.ffn_norm1(x)))

    # raw adaLN chunks (B', D) each, and the modulation row of every token (None: one row for all)
    if noise_mask is not None:         # omni mode: rows [noisy_0..noisy_B-1, clean_0..clean_B-1]
        mod = torch.cat([block.adaLN_modulation(adaln_noisy), block.adaLN_modulation(adaln_clean)])
        rows = torch.arange(batch, device=x.device)[:, None].expand(batch, seq)
        index = torch.where(noise_mask == 1, rows, rows + batch).reshape(-1)
    else:
        mod = block.adaLN_modulation(adaln_input)
        index = None if batch == 1 else torch.arange(batch, device=x.device).repeat_interleave(seq)
    scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)

    if not epilogues:                  # diffusers' maths, only the attention swapped
        def per_token(v: Tensor) -> Tensor:     # (B', D) -> (B, 1, D) broadcast over L, or (B, L, D) per token
            return v[:, None] if noise_mask is None else v[index].view(batch, seq, dim)

        scale_msa, scale_mlp = 1.0 + per_token(scale_msa), 1.0 + per_token(scale_mlp)
        gate_msa, gate_mlp = per_token(gate_msa).tanh(), per_token(gate_mlp).tanh()
        x = x + gate_msa * block.attention_norm2(attend(block.attention_norm1(x) * scale_msa))
        return x + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * scale_mlp))

    tokens = x.reshape(batch * seq, dim)     # (T, D) packed rows, sample b = rows b*L .. b*L+L-1
    n1, n2, f1, f2 = block.attention_norm1, block.attention_norm2, block.ffn_norm1, block.ffn_norm2
    h = modulated_rms_norm(tokens, n1.weight, scale_msa, index, n1.eps)
    a = attend(h.view(batch, seq, dim)).reshape(batch * seq, dim)
    tokens = gated_residual(tokens, a, n2.weight, gate_msa, index, n2.eps)
    h = modulated_rms_norm(tokens, f1.weight, scale_mlp, index, f1.eps)
    f = block.feed_forward(h.view(batch, seq, dim)).reshape(batch * seq, dim)
    return gated_residual(tokens, f, f2.weight, gate_mlp, index, f2.eps).view(batch, seq, dim)


def _apply_rotary_emb(x_in: Tensor, freqs_cis: Tensor) -> Tensor:
    # diffusers' ZSingleStreamAttnProcessor RoPE (complex multiply of adjacent pairs in fp32), for epilogues=False
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x_in)


def _zimage_attention(attn: nn.Module, h: Tensor, attn_mask: Tensor | None, freqs_cis: Tensor | None,
                      cos_sin: tuple[Tensor, Tensor] | None, attention: str) -> Tensor:
    """ZSingleStreamAttnProcessor.__call__ with qk_norm_rope and a choice of attention. h: (B, L, D) -> (B, L, D)."""
    batch, seq, _ = h.shape
    q, k, v = (proj(h).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))  # (B,L,H,hd)
    if cos_sin is not None and attn.norm_q is not None:
        q, k = qk_norm_rope(q.flatten(0, 1), k.flatten(0, 1), attn.norm_q.weight, attn.norm_k.weight, *cos_sin,
                            attn.norm_q.eps)
        q, k = q.view(batch, seq, *q.shape[1:]), k.view(batch, seq, *k.shape[1:])
    else:
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if freqs_cis is not None:
            q, k = _apply_rotary_emb(q, freqs_cis), _apply_rotary_emb(k, freqs_cis)
    dtype = q.dtype
    if attention == "dopsd":
        out = _packed(q, k, v, attn_mask)
    else:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        mask = attn_mask[:, None, None, :] if attn_mask is not None and attn_mask.ndim == 2 else attn_mask
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                    backend=attn.processor._attention_backend,
                                    parallel_config=attn.processor._parallel_config)
    out = attn.to_out[0](out.flatten(2, 3).to(dtype))
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def _packed(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
    """(B, L, H, hd) padded batch -> our packed attention -> (B, L, H, hd). Without a mask every sample is one full
    segment. With a bool key mask (B, L), each sample's L queries (padding rows included, as in diffusers) attend
    to its valid keys only: separate query / key segments, the keys gathered by the mask (a host sync)."""
    batch, seq, heads, hd = q.shape
    # one dtype, as SDPA under autocast makes it: q / k leave the norm in the norm weight's dtype (fp32 weights under
    # autocast), v leaves its projection in the compute dtype
    qf, kf, vf = (t.reshape(batch * seq, heads, hd).to(v.dtype) for t in (q, k, v))
    cu_q = torch.arange(0, batch + 1, device=q.device, dtype=torch.int32) * seq
    if attn_mask is None:
        return packed_attention(qf, kf, vf, cu_q, seq).view(batch, seq, heads, hd)
    return _masked_packed(qf, kf, vf, cu_q, attn_mask).view(batch, seq, heads, hd)


def _masked_packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, attn_mask: Tensor) -> Tensor:
    batch, seq = attn_mask.shape[0], attn_mask.shape[-1]
    keep = attn_mask.reshape(batch * seq).bool()
    lengths = attn_mask.reshape(batch, seq).sum(1)
    cu_k = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return packed_attention_with_lse(q, k[keep], v[keep], cu_q, cu_k, seq, int(lengths.max()))[0]


# The masked path reads the mask on the host (data-dependent key count): under torch.compile it runs eagerly, one
# graph break per layer, instead of dynamo recompiling around nonzero / item (as dopsd_fast.ops.packed_attention
# does for its segment loop).
_masked_packed = torch.compiler.disable(_masked_packed_attention)


# ----------------------------------------------------------------------------------------------------- FLUX.2
def _check_flux2_block(block: nn.Module, df: types.ModuleType) -> None:
    attn = block.attn
    norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k]
                                          if isinstance(block, df.Flux2TransformerBlock) else [])
    for norm in norms:
        if norm.weight is None:
            raise ValueError("FLUX.2 QK RMSNorm without a weight: not a FLUX.2 [klein] checkpoint layout")
    expected = (df.Flux2AttnProcessor if isinstance(block, df.Flux2TransformerBlock)
                else df.Flux2ParallelSelfAttnProcessor)
    if type(attn.processor) is not expected:
        raise ValueError(f"attention processor {type(attn.processor).__name__}: apply_dopsd_kernels replaces "
                         f"{expected.__name__}'s maths only (the KV-cache processors are not patched)")
    if "forward" in block.__dict__:
        raise ValueError(f"{type(block).__name__} already has an instance-level forward (another patch or hook)")


def _flux2_plain(temb_mods: tuple[Tensor, ...], rotary: Any, kwargs: dict | None) -> bool:
    """Whether a FLUX.2 block call is the plain text-to-image path this patch covers: per-sample modulation (B, k*D),
    a (cos, sin) RoPE pair and no KV-cache arguments. Anything else runs diffusers' own forward."""
    return (all(m.ndim == 2 for m in temb_mods) and isinstance(rotary, (tuple, list)) and len(rotary) == 2
            and not any(k.startswith(("kv_cache", "num_ref", "num_txt")) for k in (kwargs or {})))


def _flux2_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift; x (B, L, D), shift / scale (B, D) raw modulation chunks."""
    batch, seq, dim = x.shape
    index = None if batch == 1 else torch.arange(batch, device=x.device).repeat_interleave(seq)
    return modulated_layer_norm(x.reshape(batch * seq, dim), shift, scale, index, eps).view(batch, seq, dim)


def _flux2_qk(q: Tensor, k: Tensor, norm_q: nn.Module, norm_k: nn.Module, cos_sin: tuple[Tensor, Tensor],
              rotary: tuple[Tensor, Tensor], rows: slice | None) -> tuple[Tensor, Tensor]:
    """RMS q / k norms then RoPE. q, k: (B, L, H, hd) (a slice ``rows`` of the joint sequence's RoPE rows, or all)."""
    batch, seq = q.shape[:2]
    if cos_sin is None:     # epilogues=False: diffusers' own maths
        from diffusers.models.embeddings import apply_rotary_emb

        cos, sin = rotary if rows is None else (rotary[0][rows], rotary[1][rows])
        return (apply_rotary_emb(norm_q(q), (cos, sin), sequence_dim=1),
                apply_rotary_emb(norm_k(k), (cos, sin), sequence_dim=1))
    cos, sin = cos_sin
    if rows is not None:     # (B*S, hd/2) -> this stream's rows of every sample
        total = cos.shape[0] // batch
        cos, sin = (t.view(batch, total, -1)[:, rows].reshape(batch * seq, -1) for t in (cos, sin))
    eps = norm_q.eps if norm_q.eps is not None else torch.finfo(q.dtype).eps
    q, k = qk_norm_rope(q.flatten(0, 1), k.flatten(0, 1), norm_q.weight, norm_k.weight, cos, sin, eps)
    return q.view(batch, seq, *q.shape[1:]), k.view(batch, seq, *k.shape[1:])


def _flux2_attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, attention: str) -> Tensor:
    """Joint bidirectional attention without a mask: (B, S, H, hd) -> (B, S, H*hd)."""
    if attention == "dopsd":
        out = _packed(q, k, v, None)
    else:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(q, k, v, attn_mask=None, backend=attn.processor._attention_backend,
                                    parallel_config=attn.processor._parallel_config)
    return out.flatten(2, 3).to(q.dtype)


def _flux2_double_forward(block: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor,
                          temb_mod_img: Tensor, temb_mod_txt: Tensor, image_rotary_emb: Any = None,
                          joint_attention_kwargs: dict | None = None, *, rope: _CosSin, attention: str,
                          epilogues: bool) -> tuple[Tensor, Tensor]:
    """Flux2TransformerBlock.forward (diffusers 0.42): modulated LayerNorms and QK-norm + RoPE on our ops; the raw-gate
    residuals stay diffusers' (x + gate * a has no norm to fuse). Returns (encoder_hidden_states, hidden_states)."""
    if not _flux2_plain((temb_mod_img, temb_mod_txt), image_rotary_emb, joint_attention_kwargs):
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                                   image_rotary_emb, joint_attention_kwargs)
    from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

    batch, n_img, _ = hidden_states.shape
    n_txt = encoder_hidden_states.shape[1]
    attn = block.attn
    mi, mt = temb_mod_img.chunk(6, dim=-1), temb_mod_txt.chunk(6, dim=-1)    # (shift, scale, gate) x 2, (B, D) each
    if epilogues:
        h_img = _flux2_norm(hidden_states, mi[0], mi[1], block.norm1.eps)
        h_txt = _flux2_norm(encoder_hidden_states, mt[0], mt[1], block.norm1_context.eps)
        cos_sin = rope.real(*image_rotary_emb, batch)
    else:
        h_img = (1 + mi[1][:, None]) * block.norm1(hidden_states) + mi[0][:, None]
        h_txt = (1 + mt[1][:, None]) * block.norm1_context(encoder_hidden_states) + mt[0][:, None]
        cos_sin = None
    q, k, v, eq, ek, ev = _get_qkv_projections(attn, h_img, h_txt)
    q, k, v, eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v, eq, ek, ev))
    eq, ek = _flux2_qk(eq, ek, attn.norm_added_q, attn.norm_added_k, cos_sin, image_rotary_emb, slice(0, n_txt))
    q, k = _flux2_qk(q, k, attn.norm_q, attn.norm_k, cos_sin, image_rotary_emb, slice(n_txt, n_txt + n_img))
    out = _flux2_attention(attn, torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1), attention)
    txt_out, img_out = out.split_with_sizes([n_txt, n_img], dim=1)
    img_out = attn.to_out[1](attn.to_out[0](img_out))
    txt_out = attn.to_add_out(txt_out)

    hidden_states = hidden_states + mi[2][:, None] * img_out
    if epilogues:
        h = _flux2_norm(hidden_states, mi[3], mi[4], block.norm2.eps)
    else:
        h = block.norm2(hidden_states) * (1 + mi[4][:, None]) + mi[3][:, None]
    hidden_states = hidden_states + mi[5][:, None] * block.ff(h)

    encoder_hidden_states = encoder_hidden_states + mt[2][:, None] * txt_out
    if epilogues:
        h = _flux2_norm(encoder_hidden_states, mt[3], mt[4], block.norm2_context.eps)
    else:
        h = block.norm2_context(encoder_hidden_states) * (1 + mt[4][:, None]) + mt[3][:, None]
    encoder_hidden_states = encoder_hidden_states + mt[5][:, None] * block.ff_context(h)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _flux2_single_forward(block: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None,
                          temb_mod: Tensor, image_rotary_emb: Any = None, joint_attention_kwargs: dict | None = None,
                          split_hidden_states: bool = False, text_seq_len: int | None = None, *, rope: _CosSin,
                          attention: str, epilogues: bool) -> Tensor | tuple[Tensor, Tensor]:
    """Flux2SingleTransformerBlock.forward (diffusers 0.42): parallel attention + MLP with the modulated LayerNorm and
    QK-norm + RoPE on our ops."""
    if not _flux2_plain((temb_mod,), image_rotary_emb, joint_attention_kwargs):
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb,
                                   joint_attention_kwargs, split_hidden_states, text_seq_len)
    if encoder_hidden_states is not None:
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    batch = hidden_states.shape[0]
    attn = block.attn
    shift, scale, gate = temb_mod.chunk(3, dim=-1)       # (B, D) each, raw
    if epilogues:
        h = _flux2_norm(hidden_states, shift, scale, block.norm.eps)
        cos_sin = rope.real(*image_rotary_emb, batch)
    else:
        h = (1 + scale[:, None]) * block.norm(hidden_states) + shift[:, None]
        cos_sin = None
    proj = attn.to_qkv_mlp_proj(h)
    qkv_dim = 3 * attn.inner_dim
    local_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + attn.mlp_hidden_dim * attn.mlp_mult_factor)
    qkv, mlp = torch.split(proj, [local_qkv, proj.shape[-1] - local_qkv], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
    q, k = _flux2_qk(q, k, attn.norm_q, attn.norm_k, cos_sin, image_rotary_emb, None)
    out = _flux2_attention(attn, q, k, v, attention)
    out = attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))
    hidden_states = hidden_states + gate[:, None] * out
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    if split_hidden_states:
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return hidden_states

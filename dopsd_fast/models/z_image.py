"""Z-Image S3-DiT (text-to-image mode) with packed variable-length internals.

Maths equal diffusers' `ZImageTransformer2DModel` (padded batch + key mask); parameter names equal the official
checkpoint keys. Instead of padding a batch to its longest sample, every stage keeps one packed token tensor
(total_tokens, dim) plus int32 `cu_seqlens`, and attention runs per segment through `packed_attention`.
So samples with different caption lengths, image sizes and t share one forward without wasted tokens.

Per-sample sequence layout (see shared/reference/models.md section 2.3):
  caption: Lc real tokens + learned `cap_pad_token` up to Lc32 = ceil(Lc/32)*32; RoPE ids (1+j, 0, 0), j < Lc32.
  image:   N = F'*H'*W' patch tokens + learned `x_pad_token` up to N32; ids (Lc32+1+f, h, w), pads (0, 0, 0).
  unified: [image (N32), caption (Lc32)] -- pads are attended like real tokens (only batch padding is masked).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dopsd_fast.ops.epilogues import gated_residual, modulated_layer_norm, modulated_rms_norm, qk_norm_rope
from dopsd_fast.ops.packed_attention import packed_attention

from .checkpointing import CheckpointPlan, run_block
from .layout_cache import LayoutCache
from dopsd_fast.ops.reference import rms_norm_ref, rope_ref

SEQ_MULTIPLE = 32  # caption and image token lists are each padded to a multiple of this
ADALN_EMBED_DIM = 256  # width of t_emb (capped at dim)
TIME_FREQ_DIM = 256  # sinusoidal timestep features
TIME_HIDDEN_DIM = 1024
QK_NORM_EPS = 1e-5  # hard-coded in diffusers, independent of norm_eps
FINAL_NORM_EPS = 1e-6


@dataclass
class ZImageConfig:
    """Defaults = official Z-Image-Turbo `transformer/config.json`."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)

    @classmethod
    def from_dict(cls, d: dict) -> "ZImageConfig":
        """Build from a dict (e.g. a hub config.json). Keys starting with "_" (diffusers metadata such as
        `_class_name`) are skipped; any other unknown key raises ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ZImageConfig keys: {unknown}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def round_up(n: int, multiple: int = SEQ_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


class RMSNorm(nn.Module):
    """RMSNorm with diffusers' numerics: statistics in fp32, result cast to a half-precision weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm_ref(x, self.weight, self.eps)


@dataclass
class PackedSequence:
    """Segment layout of one packed token tensor (T = sum(lengths) rows)."""

    lengths: list[int]  # tokens per sample
    cu_seqlens: Tensor  # int32 (B+1,)
    max_seqlen: int
    sample_index: Tensor  # int64 (T,): sample id of each token, to expand per-sample modulation
    rope_cos: Tensor  # fp32 (T, head_dim/2)
    rope_sin: Tensor  # fp32 (T, head_dim/2)

    @classmethod
    def build(cls, lengths: list[int], rope_cos: Tensor, rope_sin: Tensor) -> "PackedSequence":
        device = rope_cos.device
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        return cls(lengths, cu, max(lengths), sample_index_of(lengths, device), rope_cos, rope_sin)


def sample_index_of(lengths: list[int], device: torch.device) -> Tensor:
    """int64 (sum(lengths),): the sample id of every packed token."""
    index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # on the host: no device sync
    return index.to(device)


def rope_cos_sin(positions: Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """positions: int (T, n_axes) -> cos, sin fp32 (T, sum(axes_dims)/2).

    Angle of pair i on an axis of width d = pos * theta**(-2i/d), formed in fp64 and rounded to fp32
    exactly like diffusers' precomputed table, so lookups and on-the-fly values agree bit for bit.
    """
    angles = []
    for axis, d in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d)
        angles.append((positions[:, axis, None].double() * omega).float())
    angle = torch.cat(angles, dim=-1)
    return torch.cos(angle), torch.sin(angle)


class ZImageAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # ".0" in checkpoint keys
        head_dim = dim // n_heads
        self.norm_q = RMSNorm(head_dim, QK_NORM_EPS) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, QK_NORM_EPS) if qk_norm else None

    def forward(self, x: Tensor, seq: PackedSequence) -> Tensor:
        # x: (T, dim) -> q, k, v: (T, heads, head_dim)
        q, k, v = (proj(x).unflatten(-1, (self.n_heads, -1)) for proj in (self.to_q, self.to_k, self.to_v))
        if self.norm_q is not None:      # per-head RMSNorm + RoPE on Q and K in one pass
            q, k = qk_norm_rope(q, k, self.norm_q.weight, self.norm_k.weight, seq.rope_cos, seq.rope_sin, QK_NORM_EPS)
        else:
            q, k = rope_ref(q, seq.rope_cos, seq.rope_sin), rope_ref(k, seq.rope_cos, seq.rope_sin)
        out = packed_attention(q, k, v, seq.cu_seqlens, seq.max_seqlen)
        return self.to_out[0](out.flatten(1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ZImageBlock(nn.Module):
    """Sandwich-norm block; modulated blocks get tanh-gated adaLN scale (no shift) from t_emb."""

    def __init__(self, cfg: ZImageConfig, modulated: bool):
        super().__init__()
        dim = cfg.dim
        self.attention = ZImageAttention(dim, cfg.n_heads, cfg.qk_norm)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))  # same float expression as the reference
        self.attention_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.modulated = modulated
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, ADALN_EMBED_DIM), 4 * dim, bias=True))

    def forward(self, x: Tensor, seq: PackedSequence, t_emb: Tensor | None = None) -> Tensor:
        # x: (T, dim); t_emb: (B, adaln_dim) or None for context_refiner blocks
        if not self.modulated:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), seq))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        # (B, dim) each, raw: the fused epilogues add the 1 to the scales, apply tanh to the gates, and pick
        # each token's row through sample_index
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(t_emb).chunk(4, dim=-1)
        idx, eps = seq.sample_index, self.attention_norm1.eps
        h = modulated_rms_norm(x, self.attention_norm1.weight, scale_msa, idx, eps)
        x = gated_residual(x, self.attention(h, seq), self.attention_norm2.weight, gate_msa, idx, eps)
        h = modulated_rms_norm(x, self.ffn_norm1.weight, scale_mlp, idx, eps)
        return gated_residual(x, self.feed_forward(h), self.ffn_norm2.weight, gate_mlp, idx, eps)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_EMBED_DIM), dim, bias=True))

    def forward(self, x: Tensor, sample_index: Tensor, t_emb: Tensor) -> Tensor:
        # x: (T, dim); sample_index: (T,); t_emb: (B, adaln_dim) -> (T, out_dim)
        scale = self.adaLN_modulation(t_emb)      # (B, dim); the op applies 1 + scale per token
        return self.linear(modulated_layer_norm(x, None, scale, sample_index, FINAL_NORM_EPS))


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIME_FREQ_DIM, TIME_HIDDEN_DIM, bias=True),
            nn.SiLU(),
            nn.Linear(TIME_HIDDEN_DIM, out_dim, bias=True),
        )

    def forward(self, t: Tensor) -> Tensor:
        # t: (B,) already scaled by t_scale -> (B, out_dim); sinusoid [cos | sin] in fp32
        half = TIME_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def patchify(latent: Tensor, p: int, fp: int) -> tuple[Tensor, tuple[int, int, int]]:
    """(C, F, H, W) -> tokens (F'*H'*W', fp*p*p*C), row-major over (f', h', w'), feature order (pf, ph, pw, c)."""
    c, f, h, w = latent.shape
    if f % fp or h % p or w % p:
        raise ValueError(f"latent {tuple(latent.shape)} is not divisible by patch ({fp}, {p}, {p})")
    grid = (f // fp, h // p, w // p)
    tokens = latent.reshape(c, grid[0], fp, grid[1], p, grid[2], p).permute(1, 3, 5, 2, 4, 6, 0)
    return tokens.reshape(-1, fp * p * p * c), grid


def unpatchify(tokens: Tensor, grid: tuple[int, int, int], p: int, fp: int) -> Tensor:
    """Inverse of `patchify`: (F'*H'*W', fp*p*p*C) -> (C, F'*fp, H'*p, W'*p)."""
    gf, gh, gw = grid
    c = tokens.shape[-1] // (fp * p * p)
    return tokens.view(gf, gh, gw, fp, p, p, c).permute(6, 0, 3, 1, 4, 2, 5).reshape(c, gf * fp, gh * p, gw * p)


def image_positions(grid: tuple[int, int, int], n_padded: int, caption_len: int) -> Tensor:
    """int64 (n_padded, 3) RoPE ids: (caption_len + 1 + f, h, w) row-major per patch, then (0, 0, 0) per pad."""
    gf, gh, gw = grid
    axes = [torch.arange(caption_len + 1, caption_len + 1 + gf), torch.arange(gh), torch.arange(gw)]
    ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    return torch.cat([ids, torch.zeros(n_padded - ids.shape[0], 3, dtype=torch.int64)])


@dataclass
class CaptionContext:
    """Caption tokens after cap_embedder, pad tokens and context_refiner; independent of x and t."""

    tokens: Tensor  # (sum_i Lc32_i, dim)
    lengths: list[int]  # Lc32_i per sample (multiple of 32)
    rope_cos: Tensor  # fp32 (sum_i Lc32_i, head_dim/2)
    rope_sin: Tensor
    # what the RoPE tables are a function of (encode_context's layout key): forwards with equal keys and image
    # shapes reuse one layout; None (a hand-made context) builds the forward's layout afresh every time
    layout_key: tuple | None = None


@dataclass
class ImageLayout:
    """What a forward derives from the image grids and caption lengths alone (cached: models/layout_cache.py)."""

    img: PackedSequence  # noise refiner: [patches, pads] per sample, RoPE of the image ids
    uni: PackedSequence  # main layers: [image, caption] per sample
    out_index: Tensor  # int64 (sum N_i,): sample id of every real image token (final layer)


class ZImageTransformer(nn.Module):
    """Z-Image S3-DiT; `state_dict()` keys equal the official / diffusers text-to-image checkpoint keys."""

    repeated_blocks = (ZImageBlock,)     # what model.compile=blocks compiles (models/compile.py)

    def __init__(self, config: ZImageConfig | None = None):
        super().__init__()
        cfg = config or ZImageConfig()
        if cfg.n_kv_heads != cfg.n_heads:
            # diffusers (and the checkpoint: to_k/to_v are dim x dim) ignore n_kv_heads; no GQA exists to load.
            raise ValueError(f"n_kv_heads={cfg.n_kv_heads} != n_heads={cfg.n_heads}: GQA is not supported")
        if sum(cfg.axes_dims) != cfg.head_dim:
            raise ValueError(f"sum(axes_dims)={sum(cfg.axes_dims)} must equal head_dim={cfg.head_dim}")
        if len(cfg.all_patch_size) != len(cfg.all_f_patch_size):
            raise ValueError("all_patch_size and all_f_patch_size must have the same length")
        self.config = cfg
        self.checkpointing = CheckpointPlan()
        self.layouts = LayoutCache()     # packed layouts and RoPE tables by shapes (context and forward keys)
        c = cfg.in_channels
        patches = list(zip(cfg.all_patch_size, cfg.all_f_patch_size))
        self.all_x_embedder = nn.ModuleDict({f"{p}-{fp}": nn.Linear(fp * p * p * c, cfg.dim) for p, fp in patches})
        self.all_final_layer = nn.ModuleDict({f"{p}-{fp}": FinalLayer(cfg.dim, p * p * fp * c) for p, fp in patches})
        self.noise_refiner = nn.ModuleList([ZImageBlock(cfg, modulated=True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([ZImageBlock(cfg, modulated=False) for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(min(cfg.dim, ADALN_EMBED_DIM))
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.layers = nn.ModuleList([ZImageBlock(cfg, modulated=True) for _ in range(cfg.n_layers)])
        # Text-to-image uses the first (in Turbo: only) patch configuration.
        self.patch_size, self.f_patch_size = patches[0]

    # ---- helpers -------------------------------------------------------------------------------------
    def _check_positions(self, max_per_axis: tuple[int, int, int]) -> None:
        # diffusers indexes a table of axes_lens rows; keep its bound so configs mean the same thing.
        for axis, (pos, limit) in enumerate(zip(max_per_axis, self.config.axes_lens)):
            if pos >= limit:
                raise ValueError(f"RoPE position {pos} on axis {axis} exceeds axes_lens[{axis}]={limit}")

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(positions, self.config.axes_dims, self.config.rope_theta)

    @staticmethod
    def _interleave(parts_a: list[Tensor], parts_b: list[Tensor]) -> Tensor:
        """Per sample concatenation [a_i, b_i], packed: (sum_i len a_i + len b_i, ...)."""
        return torch.cat([t for pair in zip(parts_a, parts_b) for t in pair], dim=0)

    # ---- caption path ----------------------------------------------------------------------------------
    def encode_context(self, cap_feats: list[Tensor]) -> CaptionContext:
        """cap_feats[i]: (L_i, cap_feat_dim) real text-encoder tokens -> refined, padded caption tokens."""
        real = [int(c.shape[0]) for c in cap_feats]
        if min(real) <= 0:
            raise ValueError("every caption needs at least one token")
        padded = [round_up(n) for n in real]
        self._check_positions((max(padded), 0, 0))
        emb = self.cap_embedder(torch.cat(list(cap_feats), dim=0))  # (sum L_i, dim)
        pad = self.cap_pad_token.to(emb.dtype)
        pads = [pad.expand(p - n, -1) for n, p in zip(real, padded)]
        tokens = self._interleave(list(emb.split(real)), pads)  # (sum Lc32_i, dim)

        key = ("caption", tuple(padded), tokens.device)
        seq = self.layouts.get(key, lambda: self._caption_layout(padded, tokens.device))
        for i, block in enumerate(self.context_refiner):   # numbered in call order: context, noise refiners, layers
            tokens = run_block(self.checkpointing, i, block, tokens, seq, None)
        return CaptionContext(tokens, padded, seq.rope_cos, seq.rope_sin, key)

    def _caption_layout(self, padded: list[int], device: torch.device) -> PackedSequence:
        positions = torch.zeros(sum(padded), 3, dtype=torch.int64)
        positions[:, 0] = torch.cat([torch.arange(1, p + 1) for p in padded])  # (1+j, 0, 0), pads included
        cos, sin = self._rope(positions.to(device))
        return PackedSequence.build(padded, cos, sin)

    # ---- full forward ----------------------------------------------------------------------------------
    def forward(
        self,
        x: list[Tensor],
        t: Tensor,
        cap_feats: list[Tensor] | None = None,
        context: CaptionContext | None = None,
    ) -> list[Tensor]:
        """x[i]: (C, F, H, W) latents; t: (B,) model time in [0, 1] (Z-Image: t = 1 - sigma), scaled by t_scale
        here; exactly one of cap_feats / context. Returns [(C, F, H, W)] predictions (x0 - eps), in x's order."""
        if (cap_feats is None) == (context is None):
            raise ValueError("pass exactly one of cap_feats / context")
        if context is None:
            context = self.encode_context(cap_feats)
        batch = len(x)
        if len(context.lengths) != batch:
            raise ValueError(f"{batch} latents but {len(context.lengths)} captions")
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        key = f"{self.patch_size}-{self.f_patch_size}"
        embedder = self.all_x_embedder[key]
        t_emb = self.t_embedder(t.float() * self.config.t_scale).to(embedder.weight.dtype)  # (B, adaln_dim)

        p, fp = self.patch_size, self.f_patch_size
        patches, grids = zip(*(patchify(lat, p, fp) for lat in x))
        real = [g[0] * g[1] * g[2] for g in grids]
        padded = [round_up(n) for n in real]

        emb = embedder(torch.cat(patches, dim=0).to(embedder.weight.dtype))  # (sum N_i, dim)
        pad = self.x_pad_token.to(emb.dtype)
        img = self._interleave(list(emb.split(real)), [pad.expand(q - n, -1) for n, q in zip(real, padded)])

        # the same for all K steps and both roles of an iteration: built once per shapes, kept on the device
        layout_key = None if context.layout_key is None else ("image", grids, context.layout_key)
        layout = self.layouts.get(layout_key, lambda: self._image_layout(grids, padded, context, img.device))
        for i, block in enumerate(self.noise_refiner, start=len(self.context_refiner)):
            img = run_block(self.checkpointing, i, block, img, layout.img, t_emb)

        # Unified sequence per sample: [image tokens, caption tokens].
        uni = self._interleave(list(img.split(padded)), list(context.tokens.to(img.dtype).split(context.lengths)))
        for i, block in enumerate(self.layers, start=2 * len(self.context_refiner)):
            uni = run_block(self.checkpointing, i, block, uni, layout.uni, t_emb)

        # Final layer is per token, so run it on the real image tokens only.
        pieces = uni.split([n for pair in zip(padded, context.lengths) for n in pair])[0::2]
        out_tokens = torch.cat([piece[:n] for piece, n in zip(pieces, real)], dim=0)  # (sum N_i, dim)
        out = self.all_final_layer[key](out_tokens, layout.out_index, t_emb)  # (sum N_i, pF*pH*pW*C)

        return [unpatchify(tokens, grid, p, fp) for tokens, grid in zip(out.split(real), grids)]

    def _image_layout(self, grids: tuple[tuple[int, int, int], ...], padded: list[int], context: CaptionContext,
                      device: torch.device) -> ImageLayout:
        # Image RoPE ids: (Lc32 + 1 + f, h, w) for patches, (0, 0, 0) for pads.
        for (gf, gh, gw), lc in zip(grids, context.lengths):
            self._check_positions((lc + gf, gh - 1, gw - 1))
        positions = torch.cat([image_positions(g, q, lc) for g, q, lc in zip(grids, padded, context.lengths)])
        img_cos, img_sin = self._rope(positions.to(device))  # built on the host, one copy
        uni_lengths = [q + lc for q, lc in zip(padded, context.lengths)]
        cap_split = context.lengths
        uni_cos = self._interleave(list(img_cos.split(padded)), list(context.rope_cos.split(cap_split)))
        uni_sin = self._interleave(list(img_sin.split(padded)), list(context.rope_sin.split(cap_split)))
        real = [g[0] * g[1] * g[2] for g in grids]
        return ImageLayout(PackedSequence.build(padded, img_cos, img_sin),
                           PackedSequence.build(uni_lengths, uni_cos, uni_sin), sample_index_of(real, device))

"""Analytic (algorithmic) FLOP accounting: what the maths needs, not what a kernel happens to execute.

A multiply-add counts 2 FLOPs. Norms, activations, RoPE, embedders and modulation are left out (under 1% at
the real sizes), so the numbers match the tables in models.md. Used for MFU by the trainer and the benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.z_image import SEQ_MULTIPLE, ZImageConfig, round_up


@dataclass(frozen=True)
class Flops:
    dense: float        # weight GEMMs
    attention: float    # QK^T and PV

    @property
    def total(self) -> float:
        return self.dense + self.attention

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.dense + other.dense, self.attention + other.attention)

    def __mul__(self, k: float) -> "Flops":
        return Flops(self.dense * k, self.attention * k)

    __rmul__ = __mul__


def _block(arch: ZImageConfig, tokens: int, seq_len: int) -> Flops:
    """One Z-Image block on ``tokens`` tokens that attend over sequences of ``seq_len`` tokens."""
    d, hidden = arch.dim, int(arch.dim / 3 * 8)
    dense = 2 * (4 * d * d + 3 * d * hidden) * tokens
    return Flops(dense=dense, attention=4 * seq_len * d * tokens)


def _lora_block(arch: ZImageConfig, tokens: int, rank: int) -> Flops:
    """Adapter GEMMs of one block with the official targets (to_q/k/v/out, w1/w2/w3): x A^T then (.) B^T."""
    d, hidden = arch.dim, int(arch.dim / 3 * 8)
    return Flops(dense=2 * rank * (4 * 2 * d + 3 * (d + hidden)) * tokens, attention=0.0)


def zimage_lora(arch: ZImageConfig, image_tokens: int, caption_tokens: int, rank: int) -> Flops:
    """Forward FLOPs of the LoRA adapters alone (all blocks, refiners included: the targets match by suffix)."""
    ni, lc = round_up(image_tokens, SEQ_MULTIPLE), round_up(caption_tokens, SEQ_MULTIPLE)
    return (arch.n_refiner_layers * (_lora_block(arch, ni, rank) + _lora_block(arch, lc, rank))
            + arch.n_layers * _lora_block(arch, ni + lc, rank))


def zimage_forward(arch: ZImageConfig, image_tokens: int, caption_tokens: int) -> Flops:
    """One sample's forward: noise refiner on the image, context refiner on the caption, main blocks on both.

    Token lists are padded to multiples of 32 as the model does (pads are real, attended tokens).
    """
    ni, lc = round_up(image_tokens, SEQ_MULTIPLE), round_up(caption_tokens, SEQ_MULTIPLE)
    refiners = arch.n_refiner_layers * (_block(arch, ni, ni) + _block(arch, lc, lc))
    return refiners + arch.n_layers * _block(arch, ni + lc, ni + lc)


def klein_forward(arch, target_tokens: int, text_tokens: int, ref_tokens: int = 0) -> Flops:
    """One FLUX.2 [klein] sample (arch: Flux2KleinConfig): every double or single block applies 4D^2 + 3 D mlp_hidden
    weights to each token of the joint sequence (text + target + reference tokens) and attends over all of it; plus
    the input projections (all tokens) and proj_out (target tokens), which are ~0.3% at 512 text tokens."""
    d, image = arch.dim, target_tokens + ref_tokens
    seq = image + text_tokens
    blocks = arch.num_layers + arch.num_single_layers
    embed = arch.joint_attention_dim * text_tokens + arch.in_channels * image + (arch.out_channels or arch.in_channels) * target_tokens
    dense = blocks * 2 * (4 * d * d + 3 * d * arch.mlp_hidden) * seq + 2 * d * embed
    return Flops(dense=dense, attention=blocks * 4 * seq * d * seq)


def verl_omni_iteration(teacher: Flops, student: Flops, steps: int) -> Flops:
    """One D-OPSD iteration under VeRL-Omni's diffusion MFU convention (verl-omni's diffusion FLOPs counter, after
    verl's LLM counter), logged beside ours so runs compare with numbers that convention produces: a trained
    forward counts 3 x (dense 6 FLOPs per weight per token, non-causal attention 12 s^2 d per head and layer, as
    if every weight got a gradient), a forward-only pass 1 x; adapters are not counted. Per roll-out step: the
    teacher forward (no autograd) and the student forward + backward."""
    return steps * (teacher + 3 * student)


def zimage_image_tokens(height: int, width: int, vae_factor: int = 8, patch: int = 2) -> int:
    return (height // vae_factor // patch) * (width // vae_factor // patch)


def dopsd_iteration(arch: ZImageConfig, image_tokens: int, student_caption: int, teacher_caption: int, steps: int,
                    lora_rank: int | None = None) -> Flops:
    """Model FLOPs of one D-OPSD iteration: K x (teacher forward + student forward + student backward).

    Full fine-tuning: backward = 2 x forward. LoRA: the base weights get no gradient, so the backward is the
    input-gradient GEMMs (= the dense forward), the attention backward (2 x its forward) and the adapters'
    backward (dX through the adapter, dA, dB: 2 x their forward). Recompute from gradient checkpointing is not
    counted (it is not model work).
    """
    teacher = zimage_forward(arch, image_tokens, teacher_caption)
    student = zimage_forward(arch, image_tokens, student_caption)
    if lora_rank is None:
        return steps * (teacher + 3 * student)
    teacher += zimage_lora(arch, image_tokens, teacher_caption, lora_rank)
    adapters = zimage_lora(arch, image_tokens, student_caption, lora_rank)
    backward = Flops(dense=student.dense + 2 * adapters.dense, attention=2 * student.attention)
    return steps * (teacher + student + adapters + backward)

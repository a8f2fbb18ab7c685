"""Analytic (algorithmic) FLOP accounting: what the maths needs, not what a kernel happens to execute.

A multiply-add counts 2 FLOPs. Norms, activations, RoPE, modulation (and Z-Image's embedders) are left out
(under 1% at the real sizes), so the numbers match the tables in models.md. Used for MFU by the trainer and the
benchmarks.

A model's forward is a table of layer stacks (``Stack``): each linear with its (d_in, d_out) and the tokens it
sees, and the attention. The dense, attention and LoRA-adapter FLOPs all come from that one table. A forward has
two parts (``Forward``): the context path (Z-Image's caption refiner, klein's text and reference embedders),
which depends on the prompt only, and the rest, which every roll-out step runs. The trainer runs the context path
once per role per iteration (method/step.py); the authors' loop reruns it in every forward (``context_per_step``).
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from ..models.z_image import SEQ_MULTIPLE, ZImageConfig, round_up

# LoRA adapters of one run: (rank, qualified names of the adapted linears, as LoRARoles.targets lists them)
Adapters = tuple[int, Collection[str]]


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


ZERO = Flops(0.0, 0.0)


@dataclass(frozen=True)
class Stack:
    """``layers`` equal layers ``{name}.{i}`` (``name`` "": top-level modules, one layer) of one sample's forward.

    linears: path inside a layer -> (d_in, d_out, tokens through it); attention: QK^T + PV FLOPs of one layer.
    """
    name: str
    layers: int
    linears: dict[str, tuple[int, int, int]]
    attention: float = 0.0

    def base(self) -> Flops:
        return self.layers * Flops(sum(2 * i * o * n for i, o, n in self.linears.values()), self.attention)

    def named_linears(self):
        """(module name in the model, d_in, d_out, tokens) of every linear of every layer."""
        for k in range(self.layers):
            for path, (d_in, d_out, tokens) in self.linears.items():
                yield (f"{self.name}.{k}.{path}" if self.name else path), d_in, d_out, tokens

    def adapters(self, adapters: Adapters) -> Flops:
        """x A^T then (.) B^T: 2 r (d_in + d_out) FLOPs per token through each adapted linear."""
        rank, names = adapters
        return Flops(sum(2 * rank * (i + o) * n for name, i, o, n in self.named_linears() if name in names), 0.0)


@dataclass(frozen=True)
class Forward:
    """One sample's forward: ``context`` runs once per role per iteration in the trainer, ``step`` every step."""
    context: tuple[Stack, ...]
    step: tuple[Stack, ...]

    @property
    def flops(self) -> Flops:
        """One whole forward of the base weights."""
        return sum((s.base() for s in self.context + self.step), ZERO)

    def over_iteration(self, steps: int, adapters: Adapters | None = None, context_per_step: bool = False) -> Flops:
        """This role's forward FLOPs over an iteration of ``steps`` roll-out steps: the base weights, or with
        ``adapters`` the adapters alone."""
        part = Stack.base if adapters is None else (lambda s: s.adapters(adapters))
        context = sum((part(s) for s in self.context), ZERO)
        step = sum((part(s) for s in self.step), ZERO)
        return steps * step + (steps if context_per_step else 1) * context


# ------------------------------------------------------------------------------------------- the two models
def zimage_layout(arch: ZImageConfig, image_tokens: int, caption_tokens: int) -> Forward:
    """Noise refiner on the image, context refiner on the caption, main blocks on both. Token lists are padded to
    multiples of 32 as the model does (pads are real, attended tokens)."""
    ni, lc = round_up(image_tokens, SEQ_MULTIPLE), round_up(caption_tokens, SEQ_MULTIPLE)
    d, hidden = arch.dim, int(arch.dim / 3 * 8)

    def blocks(name: str, layers: int, n: int) -> Stack:
        linears = {f"attention.{p}": (d, d, n) for p in ("to_q", "to_k", "to_v", "to_out.0")}
        linears |= {"feed_forward.w1": (d, hidden, n), "feed_forward.w3": (d, hidden, n),
                    "feed_forward.w2": (hidden, d, n)}
        return Stack(name, layers, linears, attention=4 * n * n * d)

    return Forward(context=(blocks("context_refiner", arch.n_refiner_layers, lc),),
                   step=(blocks("noise_refiner", arch.n_refiner_layers, ni), blocks("layers", arch.n_layers, ni + lc)))


def zimage_forward(arch: ZImageConfig, image_tokens: int, caption_tokens: int) -> Flops:
    return zimage_layout(arch, image_tokens, caption_tokens).flops


def klein_layout(arch, target_tokens: int, text_tokens: int, ref_tokens: int = 0) -> Forward:
    """One FLUX.2 [klein] sample (arch: Flux2KleinConfig). Double blocks: the image stream (target + reference
    tokens) and the text stream through their own weights, one joint attention; single blocks: the joint sequence.
    The context path embeds the text and the references (model.encode_context); every step embeds the target and
    projects it out (~0.3% at 512 text tokens)."""
    d, h, image = arch.dim, arch.mlp_hidden, target_tokens + ref_tokens
    seq = image + text_tokens
    attention = 4 * seq * seq * d
    double = {f"attn.{p}": (d, d, image) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    double |= {f"attn.{p}": (d, d, text_tokens) for p in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    for ff, n in (("ff", image), ("ff_context", text_tokens)):
        double |= {f"{ff}.linear_in": (d, 2 * h, n), f"{ff}.linear_out": (h, d, n)}
    single = {"attn.to_qkv_mlp_proj": (d, 3 * d + 2 * h, seq), "attn.to_out": (d + h, d, seq)}
    out = arch.out_channels or arch.in_channels
    return Forward(
        context=(Stack("", 1, {"context_embedder": (arch.joint_attention_dim, d, text_tokens),
                               "x_embedder": (arch.in_channels, d, ref_tokens)}),),
        step=(Stack("", 1, {"x_embedder": (arch.in_channels, d, target_tokens), "proj_out": (d, out, target_tokens)}),
              Stack("transformer_blocks", arch.num_layers, double, attention),
              Stack("single_transformer_blocks", arch.num_single_layers, single, attention)))


def klein_forward(arch, target_tokens: int, text_tokens: int, ref_tokens: int = 0) -> Flops:
    return klein_layout(arch, target_tokens, text_tokens, ref_tokens).flops


def zimage_image_tokens(height: int, width: int, vae_factor: int = 8, patch: int = 2) -> int:
    return (height // vae_factor // patch) * (width // vae_factor // patch)


# ------------------------------------------------------------------------------------------- one iteration
def dopsd_iteration(teacher: Forward, student: Forward, steps: int, adapters: Adapters | None = None,
                    context_per_step: bool = False) -> Flops:
    """Model FLOPs of one sample's D-OPSD iteration: K x (teacher forward + student forward + student backward),
    the context path once per role (``context_per_step``: in every forward, as the authors' loop runs it).

    Full fine-tuning (``adapters`` None): backward = 2 x forward. LoRA: the base weights get no gradient, so the
    backward is the input-gradient GEMMs (= the dense forward), the attention backward (2 x its forward) and the
    adapters' backward (dX through the adapter, dA, dB: 2 x their forward); the teacher runs its (EMA) adapters
    too. Recompute from gradient checkpointing is not counted (it is not model work).
    """
    t = teacher.over_iteration(steps, None, context_per_step)
    s = student.over_iteration(steps, None, context_per_step)
    if adapters is None:
        return t + 3 * s
    adapters = (adapters[0], frozenset(adapters[1]))     # Stack.adapters looks every linear of every layer up
    t += teacher.over_iteration(steps, adapters, context_per_step)
    a = student.over_iteration(steps, adapters, context_per_step)
    backward = Flops(dense=s.dense + 2 * a.dense, attention=2 * s.attention)
    return t + s + a + backward


def verl_omni_iteration(teacher: Forward, student: Forward, steps: int, context_per_step: bool = False) -> Flops:
    """One D-OPSD iteration under VeRL-Omni's diffusion MFU convention (verl-omni's diffusion FLOPs counter, after
    verl's LLM counter), logged beside ours so runs compare with numbers that convention produces: a trained
    forward counts 3 x (dense 6 FLOPs per weight per token, non-causal attention 12 s^2 d per head and layer, as
    if every weight got a gradient), a forward-only pass 1 x; adapters are not counted. Per roll-out step: the
    teacher forward (no autograd) and the student forward + backward; the context path as ``dopsd_iteration``."""
    return (teacher.over_iteration(steps, None, context_per_step)
            + 3 * student.over_iteration(steps, None, context_per_step))

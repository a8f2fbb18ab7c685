"""FLOP accounting: the tables in models.md §2.9, and small configs counted by hand (2 m n k per linear, 4 s^2 d per
attention layer) for what each side computes: ours runs the context path once per role, the authors' loop in
every forward; LoRA adapters on the linears the roles adapted."""
import pytest
import torch

from dopsd_fast.metrics.flops import (dopsd_iteration, klein_layout, verl_omni_iteration, zimage_forward,
                                      zimage_image_tokens, zimage_layout)
from dopsd_fast.models.flux2_klein import Flux2KleinConfig, Flux2KleinTransformer
from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer
from dopsd_fast.nn.lora_linear import inject_lora

TURBO = ZImageConfig()
TINY_Z = ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                      axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
TINY_KLEIN = Flux2KleinConfig(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4))
Z_TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


def gemm(tokens, d_in, d_out):
    return 2 * tokens * d_in * d_out


def lora(tokens, d_in, d_out, r):
    return 2 * tokens * r * (d_in + d_out)


@pytest.mark.parametrize("res, caption, tflop, share", [
    (1024, 128, 56.6, 0.15), (1024, 512, 62.5, 0.17), (512, 128, 13.7, 0.05), (512, 512, 18.5, 0.06)])
def test_zimage_forward_matches_models_md(res, caption, tflop, share):
    f = zimage_forward(TURBO, zimage_image_tokens(res, res), caption)
    assert f.total / 1e12 == pytest.approx(tflop, abs=0.05)
    assert f.attention / f.total == pytest.approx(share, abs=0.006)   # the table gives whole percents


def test_dense_flops_per_token_per_block():
    f = zimage_forward(ZImageConfig(n_layers=1, n_refiner_layers=0), 32, 0)
    assert f.dense / 32 == pytest.approx(353.9e6, rel=1e-3)


# ------------------------------------------------------------------------------------------- Z-Image, by hand
# TINY_Z: d = 64, FFN hidden int(64 / 3 * 8) = 170; 40 image tokens pad to 64; the teacher's 40-token caption pads
# to 64, the student's 7 tokens to 32; one layer per refiner, 2 main layers; K = 3 roll-out steps; LoRA rank 4.
D, H, K, R = 64, 170, 3, 4
NI, LT, LS = 64, 64, 32


def z_block(n):
    """(dense, attention, adapters) of one Z-Image block on n tokens, LoRA on all 7 linears."""
    dense = 4 * gemm(n, D, D) + 2 * gemm(n, D, H) + gemm(n, H, D)
    adapters = 4 * lora(n, D, D, R) + 2 * lora(n, D, H, R) + lora(n, H, D, R)
    return dense, 4 * n * n * D, adapters


def z_role(lc, context_runs):
    """(dense, attention, adapters) of one role's K forwards with a caption of lc tokens: the noise refiner and
    the 2 main layers every step, the context refiner ``context_runs`` times."""
    step = [a + 2 * b for a, b in zip(z_block(NI), z_block(NI + lc))]
    return [K * s + context_runs * c for s, c in zip(step, z_block(lc))]


def test_zimage_context_refiner_once_per_role_vs_per_forward():
    teacher, student = zimage_layout(TINY_Z, 40, 40), zimage_layout(TINY_Z, 40, 7)
    for per_step, runs in ((False, 1), (True, K)):
        t, s = sum(z_role(LT, runs)[:2]), sum(z_role(LS, runs)[:2])
        # full fine-tuning: teacher forward + student forward and backward (2 x forward); VeRL-Omni alike
        assert dopsd_iteration(teacher, student, K, context_per_step=per_step).total == t + 3 * s
        assert verl_omni_iteration(teacher, student, K, context_per_step=per_step).total == t + 3 * s
    # this config's numbers: the student's context refiner is 3,399,680 of its forward's 34,267,136 FLOPs
    assert student.flops.total == 34_267_136 and sum(z_block(LS)[:2]) == 3_399_680


def test_zimage_lora_iteration_by_hand():
    model = ZImageTransformer(TINY_Z)
    names = inject_lora(model, Z_TARGETS, ["student", "teacher"], R, 2.0 * R)
    teacher, student = zimage_layout(TINY_Z, 40, 40), zimage_layout(TINY_Z, 40, 7)
    for per_step, runs in ((False, 1), (True, K)):
        (td, ta, tl), (sd, sa, sl) = z_role(LT, runs), z_role(LS, runs)
        # teacher: base + its adapters; student: forward, then dX through the base (= its dense forward),
        # attention backward (2x) and the adapters' backward (2x their forward)
        want = (td + ta + tl) + (sd + sa + sl) + (sd + 2 * sa + 2 * sl)
        assert dopsd_iteration(teacher, student, K, (R, names), context_per_step=per_step).total == want
    # adapters on the 4 attention projections of the 2 main layers only: teacher 1x, student 3x their forward
    only = [n for n in names if n.startswith("layers.") and ".attention." in n]
    extra = dopsd_iteration(teacher, student, K, (R, only)).total - dopsd_iteration(teacher, student, K, (R, [])).total
    assert extra == K * 2 * 4 * (lora(NI + LT, D, D, R) + 3 * lora(NI + LS, D, D, R))


def test_full_fine_tuning_backward_is_two_forwards_and_lora_is_cheaper():
    n = zimage_image_tokens(512, 512)
    t, s = zimage_layout(TURBO, n, 384), zimage_layout(TURBO, n, 128)
    fwd = s.over_iteration(1).total + t.over_iteration(1).total
    full = dopsd_iteration(t, s, 1).total
    names = [f"layers.{i}.attention.to_q" for i in range(TURBO.n_layers)]
    with_lora = dopsd_iteration(t, s, 1, (64, names)).total
    assert full == pytest.approx(fwd + 2 * s.over_iteration(1).total)
    assert fwd < with_lora < full


def test_verl_omni_convention_factors_6_and_12():
    """VeRL-Omni's counter, written out for Z-Image's single stream: per layer, dense 6 (trained) or 2 (forward
    only) FLOPs per weight per token, non-causal attention 12 or 4 x s^2 x (heads x head_dim); refiners on their
    own token lists; K roll-out steps of teacher forward + student forward/backward, the caption refiner once."""
    from dopsd_fast.models.z_image import SEQ_MULTIPLE, round_up

    d, hidden = TURBO.dim, int(TURBO.dim / 3 * 8)
    weights = 4 * d * d + 3 * d * hidden

    def layer_stack(lengths: list[tuple[int, int]], dense: int, attn: int) -> float:     # (layers, tokens)
        return sum(n * (dense * weights * s + attn * s * s * d) for n, s in lengths)

    def step(image, caption, dense, attn):
        ni, lc = round_up(image, SEQ_MULTIPLE), round_up(caption, SEQ_MULTIPLE)
        return layer_stack([(TURBO.n_refiner_layers, ni), (TURBO.n_layers, ni + lc)], dense, attn)

    def context(caption, dense, attn):
        return layer_stack([(TURBO.n_refiner_layers, round_up(caption, SEQ_MULTIPLE))], dense, attn)

    n, K = zimage_image_tokens(1024, 1024), 4
    want = K * (step(n, 704, 2, 4) + step(n, 128, 6, 12)) + context(704, 2, 4) + context(128, 6, 12)
    got = verl_omni_iteration(zimage_layout(TURBO, n, 704), zimage_layout(TURBO, n, 128), K).total
    assert got == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------------- klein, by hand
def test_klein_iteration_by_hand_with_adapters_and_references():
    # d = 32, mlp hidden 96; 2 double + 3 single blocks; target 12 tokens, text 5 (student) / 9 (teacher),
    # the teacher also sees 8 reference tokens; in_channels 16 in and out, text features 24 wide
    d, h, r, k = 32, 96, 4, 2
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "attn.to_qkv_mlp_proj"]
    names = inject_lora(Flux2KleinTransformer(TINY_KLEIN), targets, ["student", "teacher"], r, 2.0 * r)

    def role(text, refs):
        image, seq = 12 + refs, 12 + refs + text
        ctx = gemm(text, 24, d) + gemm(refs, 16, d)                         # context_embedder, x_embedder (refs)
        double = (4 * gemm(image, d, d) + 4 * gemm(text, d, d) + gemm(image, d, 2 * h) + gemm(image, h, d)
                  + gemm(text, d, 2 * h) + gemm(text, h, d))
        single = gemm(seq, d, 3 * d + 2 * h) + gemm(seq, d + h, d)
        dense = gemm(12, 16, d) + gemm(12, d, 16) + 2 * double + 3 * single     # x_embedder, proj_out, blocks
        adapters = 2 * (4 * lora(image, d, d, r) + 4 * lora(text, d, d, r) + lora(image, d, 2 * h, r))
        adapters += 3 * lora(seq, d, 3 * d + 2 * h, r)
        return ctx, (dense, 5 * 4 * seq * seq * d, adapters)

    (tc, (td, ta, tl)), (sc, (sd, sa, sl)) = role(9, 8), role(5, 0)
    teacher = k * (td + ta + tl) + tc
    s_dense, s_attn, s_adapters = k * sd + sc, k * sa, k * sl
    want = teacher + (s_dense + s_attn + s_adapters) + (s_dense + 2 * s_attn + 2 * s_adapters)
    t_layout, s_layout = klein_layout(TINY_KLEIN, 12, 9, 8), klein_layout(TINY_KLEIN, 12, 5)
    assert dopsd_iteration(t_layout, s_layout, k, (r, names)).total == want
    assert t_layout.flops.total == td + ta + tc


# ------------------------------------------------------------------------------------------- table vs model
@pytest.mark.parametrize("model_cls, layout, targets", [
    (ZImageTransformer, zimage_layout(TINY_Z, 40, 7), Z_TARGETS),
    (Flux2KleinTransformer, klein_layout(TINY_KLEIN, 12, 5, 8),
     ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
      "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
      "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out"])],
    ids=["z_image", "klein"])
def test_layout_lists_every_block_linear_with_its_shape(model_cls, layout, targets):
    """The accounting's tables name the model's own linears with their shapes, so every adapter on a block
    linear is counted; the linears left out run on one row per sample (modulation, time embedding) or are
    Z-Image's embedders (see metrics/flops.py)."""
    model = model_cls(TINY_Z if model_cls is ZImageTransformer else TINY_KLEIN)
    listed = {name: (d_in, d_out) for stack in layout.context + layout.step
              for name, d_in, d_out, _ in stack.named_linears()}
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(linears[n] == shape for n, shape in listed.items())
    stacks = ("layers", "noise_refiner", "context_refiner", "transformer_blocks", "single_transformer_blocks")
    in_blocks = {n for n in linears if n.split(".")[0] in stacks and "modulation" not in n}
    assert in_blocks <= set(listed)
    assert set(inject_lora(model, targets, ["student"], 2, 2.0)) <= set(listed)

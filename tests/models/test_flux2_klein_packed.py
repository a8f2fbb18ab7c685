"""Packed double forward on FLUX.2 [klein]: teacher samples (text + reference tokens, teacher adapter) and student
samples (text, student adapter) in ONE forward equal the two per-role forwards (outputs, student gradients)."""
import pytest
import torch

from dopsd_fast.models.flux2_klein import Flux2KleinConfig, Flux2KleinTransformer, ReferenceCondition

from test_flux2_klein import TINY, randomize_  # noqa: E402  (same folder)
from test_z_image_packed import GRAD_TOL, TOL, assert_close, distinct_roles  # noqa: E402

# every linear of the model: both streams of the double blocks, the single blocks, the embedders, the per-sample
# modulation / final-norm linears (B rows) and the output projection
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
           "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out", "x_embedder", "context_embedder",
           "double_stream_modulation_img.linear", "norm_out.linear", "proj_out"]


def make_roles(dtype, checkpointing):
    torch.manual_seed(0)
    model = Flux2KleinTransformer(Flux2KleinConfig(**TINY))
    randomize_(model)
    return distinct_roles(model, TARGETS, dtype, checkpointing)


def run(roles, dtype, packed):
    """3 samples: odd target grids, text lengths, and teacher references (one sample has none)."""
    g = torch.Generator().manual_seed(2)
    x = [torch.randn(16, h, w, generator=g).to(dtype) for h, w in [(3, 5), (4, 4), (2, 3)]]
    c_s = [torch.randn(n, TINY["joint_attention_dim"], generator=g).to(dtype) for n in (5, 9, 3)]
    refs = [[torch.randn(16, 2, 3, generator=g)], [], [torch.randn(16, 3, 3, generator=g)] * 2]
    c_t = [ReferenceCondition(torch.randn(n, TINY["joint_attention_dim"], generator=g), r).to(dtype)
           for n, r in zip((7, 4, 11), refs)]
    weights = [torch.rand(xi.shape, generator=g) for xi in x]
    t = torch.tensor([0.7, 0.7, 0.7])
    for p in roles.trainable.values():
        p.grad = None
    out_t, out_s = roles.teacher_and_student(x, t, roles.context("teacher", c_t), roles.context("student", c_s),
                                             packed=packed)
    assert not any(o.requires_grad for o in out_t), "teacher outputs are stopped"
    sum((w * (s.float() - o.float()) ** 2).mean() for w, s, o in zip(weights, out_s, out_t)).backward()
    assert all(p.grad is None for p in roles.ema.teacher), "the teacher adapter gets no gradient"
    return [o.float() for o in out_t + out_s], {k: p.grad.float() for k, p in roles.trainable.items()
                                                if p.grad is not None}


@pytest.mark.parametrize("dtype, checkpointing", [(torch.float32, False), (torch.float32, True),
                                                  (torch.bfloat16, False)])
def test_packed_equals_two_forwards(dtype, checkpointing):
    roles, _ = make_roles(dtype, checkpointing)
    (p_out, p_grads), (s_out, s_grads) = run(roles, dtype, True), run(roles, dtype, False)
    for i, (a, b) in enumerate(zip(p_out, s_out)):
        assert_close(a, b, dtype, f"output {i} (teacher 0-2, student 3-5)")
    assert set(p_grads) == set(s_grads)
    # the student context path (context_embedder) and the modulation get gradients through the packed call too
    assert any("context_embedder" in k for k in s_grads) and any("modulation" in k for k in s_grads)
    for name, g in s_grads.items():
        assert_close(p_grads[name], g, dtype, name, GRAD_TOL)

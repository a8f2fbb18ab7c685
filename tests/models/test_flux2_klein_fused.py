"""The FLUX.2 [klein] model on the fused Triton ops (interpreted on CPU) equals the model on the reference ops:
modulated LayerNorm with per-sample shift/scale, qk-norm + RoPE on views of the fused single-block projection,
and packed joint attention with reference tokens."""
import pytest
import torch

from dopsd_fast.models.flux2_klein import Flux2KleinConfig, Flux2KleinTransformer, ReferenceCondition
from dopsd_fast.ops._dispatch import use_backend

from test_flux2_klein import randomize_  # noqa: E402  (same folder)

TINY = Flux2KleinConfig(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=12, axes_dims_rope=(4, 4, 4, 4))


def run(model, backend):
    g = torch.Generator().manual_seed(5)
    x = [torch.randn(8, 3, 4, generator=g), torch.randn(8, 2, 5, generator=g)]
    conds = [ReferenceCondition(torch.randn(5, 12, generator=g), [torch.randn(8, 2, 3, generator=g)]),
             torch.randn(9, 12, generator=g)]
    model.zero_grad(set_to_none=True)
    with use_backend(backend):
        out = model(x, torch.tensor([0.2, 0.7]), cap_feats=conds)
        torch.cat([o.reshape(-1) for o in out]).pow(2).mean().backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.fused
def test_triton_ops_match_reference_ops_forward_and_backward():
    model = Flux2KleinTransformer(TINY)
    randomize_(model)
    ref_out, ref_grads = run(model, "reference")
    out, grads = run(model, "triton")
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-7,
                                   msg=lambda m: f"{name}: {m}")

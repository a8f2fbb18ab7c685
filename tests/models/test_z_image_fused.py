"""The Z-Image model on the fused Triton ops (interpreted on CPU) equals the model on the reference ops."""
import pytest
import torch

from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer
from dopsd_fast.ops._dispatch import use_backend

from test_z_image import randomize_  # noqa: E402  (same folder)

TINY = ZImageConfig(in_channels=4, dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                    axes_dims=(8, 12, 12), axes_lens=(128, 32, 32))


def run(model, backend):
    g = torch.Generator().manual_seed(5)
    x = [torch.randn(4, 1, 6, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)]
    caps = [torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)]
    model.zero_grad(set_to_none=True)
    with use_backend(backend):
        out = model(x, torch.tensor([0.2, 0.7]), cap_feats=caps)
        torch.cat([o.reshape(-1) for o in out]).pow(2).mean().backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.fused
def test_triton_ops_match_reference_ops_forward_and_backward():
    torch.manual_seed(0)
    model = ZImageTransformer(TINY)
    randomize_(model)
    ref_out, ref_grads = run(model, "reference")
    out, grads = run(model, "triton")
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-7,
                                   msg=lambda m: f"{name}: {m}")

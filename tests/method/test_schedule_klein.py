"""FLUX.2 [klein]'s empirical-mu schedule and flow convention."""
import pytest
import torch

from dopsd_fast.method.schedule import FLUX2, empirical_mu, empirical_mu_sigmas

MODELS_MD = {  # models.md 3.7: (W, H) -> mu, 4-step sigmas
    (1024, 1024): (2.2912, [1.0, 0.96738, 0.90814, 0.76720]),
    (1152, 896): (2.2858, [1.0, 0.96721, 0.90769, 0.76623]),
    (1248, 832): (2.2878, [1.0, 0.96728, 0.90786, 0.76659]),
    (1280, 720): (2.2491, [1.0, 0.96603, 0.90457, 0.75960]),
    (1344, 576): (2.2003, [1.0, 0.96439, 0.90027, 0.75057]),
    (512, 512): (2.0307, [1.0, 0.95809, 0.88398, 0.71750]),
}


@pytest.mark.parametrize("size", MODELS_MD)
def test_four_step_sigmas_match_models_md(size):
    tokens = (size[0] // 16) * (size[1] // 16)
    mu, sigmas = MODELS_MD[size]
    assert empirical_mu(tokens, 4) == pytest.approx(mu, abs=1e-4)
    assert empirical_mu_sigmas(tokens, 4) == pytest.approx(sigmas + [0.0], abs=1e-5)


@pytest.mark.parametrize("tokens, steps", [(4096, 4), (1024, 7), (5000, 3), (37, 1), (9999, 50)])
def test_sigmas_match_diffusers_dynamic_shift_scheduler(tokens, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist(), mu=empirical_mu(tokens, steps))
    ours = empirical_mu_sigmas(tokens, steps)
    assert len(ours) == steps + 1 and ours[-1] == 0.0
    assert ours == pytest.approx(sched.sigmas.tolist(), abs=1e-6)
    assert all(a > b for a, b in zip(ours, ours[1:]))


def test_klein_convention_feeds_sigma_and_predicts_eps_minus_x0():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 8, 3, generator=g), torch.randn(2, 8, 3, generator=g)
    sigma, sigma_next = 0.96738, 0.90814
    x = (1 - sigma) * x0 + sigma * eps
    out = eps - x0                                   # what klein predicts
    assert FLUX2.time(torch.tensor(sigma)).item() == pytest.approx(sigma)
    torch.testing.assert_close(FLUX2.to_x0(x, out, sigma), x0)
    torch.testing.assert_close(FLUX2.euler(x, out, sigma, sigma_next), x + (sigma_next - sigma) * out)


def test_bad_schedule_arguments_fail():
    with pytest.raises(ValueError, match="image_tokens >= 1"):
        empirical_mu_sigmas(0, 4)

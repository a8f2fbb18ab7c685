"""Flow conventions, schedules and the fp32 EMA teacher."""
import pytest
import torch

from dopsd_fast.method.divergence import rollout_loss
from dopsd_fast.method.ema import EMATeacher
from dopsd_fast.method.schedule import Z_IMAGE, FlowConvention, rollout_sigmas, shifted_sigmas

KLEIN = FlowConvention(sign=-1, time_is_sigma=True)


def test_turbo_sampler_schedule_matches_models_md():
    want = [1.0, 0.95455, 0.9, 0.83333, 0.75, 0.64286, 0.5, 0.3, 0.0]
    assert shifted_sigmas(8, 3.0) == pytest.approx(want, abs=1e-5)
    assert rollout_sigmas([1, 0.9, 0.75, 0.5]) == [1.0, 0.9, 0.75, 0.5, 0.0]


@pytest.mark.parametrize("flow", [Z_IMAGE, KLEIN], ids=["z_image", "klein"])
def test_conventions_recover_x0_and_step_along_the_straight_path(flow):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 6, generator=g), torch.randn(3, 1, 4, 6, generator=g)
    sigma, sigma_next = 0.75, 0.5
    x = (1 - sigma) * x0 + sigma * eps
    out = flow.target(x0, eps)                       # the exact model output on this path
    torch.testing.assert_close(flow.to_x0(x, out, sigma), x0)
    torch.testing.assert_close(flow.euler(x, out, sigma, sigma_next), (1 - sigma_next) * x0 + sigma_next * eps)
    assert flow.time(torch.tensor(0.25)).item() == (0.25 if flow.time_is_sigma else 0.75)


def test_x0_loss_is_sigma_squared_velocity_loss():
    g = torch.Generator().manual_seed(1)
    x, s, t = (torch.randn(2, 5, generator=g) for _ in range(3))
    for sigma in (1.0, 0.9, 0.5):
        v = rollout_loss(Z_IMAGE, [x], [s], [t], sigma, "velocity")
        x0 = rollout_loss(Z_IMAGE, [x], [s], [t], sigma, "x0")
        torch.testing.assert_close(x0, sigma**2 * v, rtol=1e-5, atol=0)


def test_rollout_loss_stops_the_teacher_gradient():
    s = torch.randn(4, requires_grad=True)
    t = torch.randn(4, requires_grad=True)
    rollout_loss(Z_IMAGE, [torch.randn(4)], [s], [t], 0.9, "x0").backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_update_is_an_fp32_lerp(dtype):
    g = torch.Generator().manual_seed(2)
    teacher = {"a": torch.randn(5, 3, generator=g).to(dtype), "b": torch.randn(7, generator=g).to(dtype)}
    student = [torch.randn(5, 3, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype)]
    want = [t.float().clone() for t in teacher.values()]
    ema = EMATeacher(teacher, student)
    for _ in range(3):
        ema.update(0.9)
        want = [0.9 * w + 0.1 * s.float() for w, s in zip(want, student)]
    for m, w, t in zip(ema.state_dict().values(), want, teacher.values()):
        assert m.dtype == torch.float32
        torch.testing.assert_close(m, w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(t, m.to(dtype), rtol=0, atol=0)    # teacher = master rounded once


def test_ema_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        EMATeacher({"a": torch.zeros(2)}, [torch.zeros(3)])

"""dopsd_step: per-step backward == hold-all-graphs backward, with less activation memory."""
import pytest
import torch

from dopsd_fast.train.memory import ActivationMeter
from dopsd_fast.testing import randomize_adapters, tiny_trainer


def grads_after_one_step(tmp_path, per_step: bool, mode: str, loss: str):
    tr = tiny_trainer(tmp_path, f"method.per_step_backward={str(per_step).lower()}", f"adapter.mode={mode}",
                      f"method.loss={loss}", "train.batch_size=2")
    if mode == "lora":
        randomize_adapters(tr)
    else:   # full mode: teacher = perturbed copy so student and teacher disagree
        with torch.no_grad():
            for t in tr.roles.ema.teacher:
                t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    out = tr.forward_backward_step(next(tr.stream))
    grads = {k: p.grad.clone() for k, p in tr.roles.trainable.items() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("loss", ["x0", "velocity"])
def test_per_step_backward_matches_hold_all(tmp_path, mode, loss):
    held, g_held = grads_after_one_step(tmp_path / "a", False, mode, loss)
    step, g_step = grads_after_one_step(tmp_path / "b", True, mode, loss)
    assert held.losses == pytest.approx(step.losses, rel=1e-6)
    assert set(g_held) == set(g_step)
    # the caption path (context_refiner) carries trainable weights: its gradient must arrive too
    assert any("context_refiner" in k and g.abs().sum() > 0 for k, g in g_step.items())
    # fp32, rtol 1e-6 in norm: both orders of summation are exact up to rounding (~6e-8 per add), and
    # per element the context-refiner gradients (sums over K steps with cancellation) differ a few 1e-6.
    worst = max((g_step[k] - g_held[k]).norm() / g_held[k].norm().clamp_min(1e-30) for k in g_held)
    assert worst <= 1e-6, f"largest relative gradient difference {worst:.2e}"


def peak_activation_bytes(tmp_path, per_step: bool) -> int:
    tr = tiny_trainer(tmp_path, f"method.per_step_backward={str(per_step).lower()}")
    randomize_adapters(tr)
    with ActivationMeter(tr.model) as meter:
        tr.forward_backward_step(next(tr.stream))
    assert meter.live == 0, "every saved activation is released by the end of the step"
    return meter.peak


def test_per_step_backward_holds_less_activation_memory(tmp_path):
    held = peak_activation_bytes(tmp_path / "a", False)
    step = peak_activation_bytes(tmp_path / "b", True)
    # K = 4 graphs vs one: the ratio is reported by bench/bench_step_memory.py; here only the direction.
    assert step < held
    print(f"peak saved activations: per-step {step} B, hold-all {held} B, ratio {held / step:.2f}")


@pytest.mark.parametrize("batch_size", [1, 2])
def test_roll_out_reads_nothing_back_but_its_losses(tmp_path, monkeypatch, batch_size):
    """Within dopsd_step no tensor value comes back to the host (on CUDA each read waits for the device) except the
    K losses, once, at the end; and once the shapes have been seen, no host->device copy is made (without pinned
    memory each waits for the device as well) but the iteration's noise. On CPU neither is a sync, so this patches
    the calls themselves: two iterations, the first building the packed layouts, the second from the model's cache
    (models/layout_cache.py) and divergence.packed_offsets."""
    import sys

    from dopsd_fast.method import step
    from dopsd_fast.method.step import dopsd_step

    step_file = step.__file__
    tr = tiny_trainer(tmp_path, f"train.batch_size={batch_size}")
    randomize_adapters(tr)
    allowed: list[str] = []

    def guard(owner, name: str, copies_only: bool = False):
        original = getattr(owner, name)

        def call(*args, **kwargs):
            if copies_only and not any(isinstance(a, (torch.device, str)) for a in (*args[1:], *kwargs.values())):
                return original(*args, **kwargs)        # a dtype cast, not a copy to a device
            if name in ("tolist", "to") and sys._getframe(1).f_code.co_filename == step_file:
                allowed.append(name)    # by design: StepOutput.losses, and the noise drawn from the host generator
                return original(*args, **kwargs)
            raise AssertionError(f"{name}() inside the roll-out")
        return call

    for warm in (False, True):
        batch = next(tr.stream)
        c_s, c_t = tr._cast(tr.text_encoder(batch.prompts)), tr._cast(tr.mm_encoder(batch.prompts, batch.images))
        shapes = [tr.codec.latent_shape(*img.shape[-2:]) for img in batch.images]
        allowed.clear()
        with monkeypatch.context() as patch:
            for name in ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero"):
                patch.setattr(torch.Tensor, name, guard(torch.Tensor, name))
            if warm:
                patch.setattr(torch.Tensor, "to", guard(torch.Tensor, "to", copies_only=True))
                for name in ("tensor", "as_tensor"):
                    patch.setattr(torch, name, guard(torch, name))
            out = dopsd_step(tr.roles, tr.flow, c_s, c_t, shapes, tr.sigmas, generator=tr.noise)
        tr.optimizer_step()
    assert allowed == ["to"] * batch_size + ["tolist"] and len(out.losses) == len(tr.sigmas) - 1

"""distill_rollout with two plain callables equals a hand-written roll-out loop (the released loop's arithmetic,
written out per model family from method.md section 3, without FlowConvention or the fused op): losses and the
student's gradients, fp32, both families, both losses, per-step or one backward, a batch tensor or a list of
unequal latents. And driven with our model's roles the way another trainer would call it (caption path recomputed
in every call, PEFT-style), it equals dopsd_step, the trainer's path (caption path once, its gradient collected on
a leaf)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from dopsd_fast.method.rollout import distill_rollout
from dopsd_fast.method.schedule import FLUX2, Z_IMAGE
from dopsd_fast.method.step import dopsd_step
from dopsd_fast.testing import randomize_adapters, tiny_trainer

SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.0]
FP32 = dict(rtol=1e-5, atol=1e-7)


class Net(torch.nn.Module):
    """A small time-conditioned predictor over (C, ...) latents: a channel mix, a tanh, a time scale."""

    def __init__(self, seed: int, channels: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.nn.Parameter(torch.randn(channels, channels, generator=g) / channels**0.5)
        self.time = torch.nn.Parameter(torch.randn(channels, generator=g))

    def one(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:      # x (C, ...), t () -> (C, ...)
        h = torch.einsum("ij,j...->i...", self.mix, x)
        return torch.tanh(h) * (1 + t * self.time.view(-1, *[1] * (x.dim() - 1)))

    def forward(self, x, t):
        if isinstance(x, torch.Tensor):
            return torch.stack([self.one(xi, ti) for xi, ti in zip(x, t)])
        return [self.one(xi, ti) for xi, ti in zip(x, t)]


def hand_written_loop(teacher, student, x, family: str, kind: str, per_step: bool) -> list[torch.Tensor]:
    """method.md section 3 per family (t, to_x0 and euler written out), the mean loss over all elements of the
    batch; one backward of the mean, or loss_k / K after each step. Returns loss_k per step."""
    samples = list(x)          # a batch (B, ...) or a list: per-sample tensors either way
    K, losses = len(SIGMAS) - 1, []
    for k in range(K):
        sigma, sigma_next = SIGMAS[k], SIGMAS[k + 1]
        t = torch.full((len(samples),), 1 - sigma if family == "z_image" else sigma)
        samples = [s.detach() for s in samples]
        with torch.no_grad():
            v_t = teacher(samples, t)
        v_s = student(samples, t)
        a, b = torch.cat([v.reshape(-1) for v in v_s]), torch.cat([v.reshape(-1) for v in v_t])
        if kind == "x0":
            xs = torch.cat([s.reshape(-1) for s in samples])
            a, b = (xs + sigma * a, xs + sigma * b) if family == "z_image" else (xs - sigma * a, xs - sigma * b)
        losses.append(F.mse_loss(a, b))
        if per_step:
            (losses[-1] / K).backward()
        if family == "z_image":      # x + v * (t_next - t), t = 1 - sigma
            samples = [s + v * ((1 - sigma_next) - (1 - sigma)) for s, v in zip(samples, v_s)]
        else:                        # x + v * (sigma_next - sigma)
            samples = [s + v * (sigma_next - sigma) for s, v in zip(samples, v_s)]
    if not per_step:
        torch.stack(losses).mean().backward()
    return [loss.detach() for loss in losses]


def noise(layout: str) -> torch.Tensor | list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    if layout == "batch":       # diffusers' Z-Image latents (B, C, F, H, W)
        return torch.randn(2, 4, 1, 6, 6, generator=g)
    return [torch.randn(4, 1, h, w, generator=g) for h, w in ((6, 6), (4, 10), (2, 2))]


CASES = list(itertools.product(["z_image", "flux2"], ["x0", "velocity"], [True, False], ["batch", "list"]))


@pytest.mark.parametrize("family,kind,per_step,layout", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_equals_a_hand_written_loop(family, kind, per_step, layout):
    teacher, student = Net(seed=1), Net(seed=2)
    x = noise(layout)
    before = [xi.clone() for xi in x]
    want = hand_written_loop(teacher, student, x, family, kind, per_step)
    want_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    got = distill_rollout(teacher, student, x, SIGMAS, Z_IMAGE if family == "z_image" else FLUX2, kind, per_step)
    assert got.dtype == torch.float32 and got.shape == (len(SIGMAS) - 1,) and not got.requires_grad
    torch.testing.assert_close(got, torch.stack(want), **FP32)
    for p, g in zip(student.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, **FP32)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(x, before)), "the noise is not modified"


def test_backward_and_weight_reach_the_caller():
    """``backward`` gets every backward of the iteration (K per-step scalars) and ``weight`` scales the gradient."""
    teacher, student = Net(seed=1), Net(seed=2)
    distill_rollout(teacher, student, noise("batch"), SIGMAS, Z_IMAGE)
    full = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    calls = []

    def backward(loss):
        calls.append(loss.detach())
        loss.backward()
    distill_rollout(teacher, student, noise("batch"), SIGMAS, Z_IMAGE, backward=backward, weight=0.25)
    assert len(calls) == len(SIGMAS) - 1 and all(c.dim() == 0 for c in calls)
    for p, g in zip(student.parameters(), full):
        torch.testing.assert_close(p.grad, 0.25 * g, **FP32)


@pytest.mark.parametrize("per_step", [True, False])
def test_another_trainers_call_equals_dopsd_step(tmp_path, per_step):
    """Our model's roles as two plain callables that run the caption path in every call (as a diffusers + PEFT
    trainer does) give dopsd_step's losses and gradients, with the same noise."""
    tr = tiny_trainer(tmp_path, "train.batch_size=2", f"method.per_step_backward={str(per_step).lower()}")
    randomize_adapters(tr)
    batch = next(tr.stream)
    c_s, c_t = tr._cast(tr.text_encoder(batch.prompts)), tr._cast(tr.mm_encoder(batch.prompts, batch.images))
    shapes = [tr.codec.latent_shape(*img.shape[-2:]) for img in batch.images]
    ours = dopsd_step(tr.roles, tr.flow, c_s, c_t, shapes, tr.sigmas, per_step_backward=per_step,
                      generator=torch.Generator().manual_seed(7))
    want = {k: p.grad.clone() for k, p in tr.roles.trainable.items()}
    assert any("context_refiner" in k and g.abs().sum() > 0 for k, g in want.items())   # the caption path trains
    for p in tr.roles.trainable.values():
        p.grad = None

    def role(name, feats):
        return lambda x, t: tr.roles.use(name)(x, t, context=tr.roles.use(name).encode_context(feats))
    g = torch.Generator().manual_seed(7)
    x = [torch.randn(s, generator=g) for s in shapes]
    losses = distill_rollout(role("teacher", c_t), role("student", c_s), x, tr.sigmas, tr.flow,
                             per_step_backward=per_step)
    assert losses.tolist() == pytest.approx(ours.losses, rel=1e-6)
    # fp32, in norm as in test_step.py: the caption path's gradient is summed in another order (per call vs on a leaf)
    worst = max(float((tr.roles.trainable[k].grad - g).norm() / g.norm().clamp_min(1e-30)) for k, g in want.items())
    assert worst <= 1e-6, f"largest relative gradient difference {worst:.2e}"

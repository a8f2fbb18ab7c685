"""One D-OPSD iteration, read top to bottom: the table of contents of the method.

fresh noise -> for k in 0..K-1: teacher(x_k, c_t) and student(x_k, c_s) at the student's state ->
divergence (teacher stopped) -> backward -> next state from the STUDENT's output (detached)  (rollout.py).
The caller then clips, steps the optimizer and updates the EMA teacher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from .divergence import flat
from .roles import Roles, detached_context
from .rollout import distill_rollout
from .schedule import FlowConvention


@dataclass
class StepOutput:
    loss: float                 # mean over the K roll-out steps
    losses: list[float]         # loss_k per roll-out step
    flops: float = 0.0          # model FLOPs of the iteration (metrics.flops), filled in by the trainer
    flops_verl_omni: float = 0.0    # the same under VeRL-Omni's MFU convention (metrics.flops.verl_omni_iteration)
    tokens: int = 0             # image tokens the student denoised (K steps x the batch), filled in by the trainer
    anchor_loss: float | None = None    # the self-distillation anchor's mean loss (method.anchor_per_iteration)


def dopsd_step(roles: Roles, flow: FlowConvention, c_s: list[Tensor], c_t: list[Tensor],
               latent_shapes: list[tuple[int, ...]], sigmas: list[float],
               loss_kind: Literal["x0", "velocity"] = "x0", per_step_backward: bool = True,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               backward: Callable[[Tensor], object] = Tensor.backward, weight: float = 1.0) -> StepOutput:
    """Roll the student out for K = len(sigmas) - 1 steps and accumulate grad of mean_k loss_k.

    ``per_step_backward`` backpropagates loss_k / K right after step k, holding one student graph instead of K;
    the gradient is the same because every state is detached (method.md section 12). The student's caption path is
    then run forward once and backward once: its output is a leaf that collects gradient over the K steps.
    ``backward`` runs every backward of the iteration on a scalar (a DeepSpeed engine passes ``engine.backward``:
    the K + 1 calls accumulate, and the engine's one ``step()`` afterwards reduces and updates). ``weight``
    multiplies the gradient (1 / N for one of N iterations accumulated into one optimizer step); the caption
    path's backward carries it through the leaf's gradient, so it is applied once.
    """
    ctx_t = roles.context("teacher", c_t)
    ctx_s_graph = roles.context("student", c_s)
    ctx_s = detached_context(ctx_s_graph) if per_step_backward else ctx_s_graph
    device = c_s[0].device    # noise comes from the host generator: one seed, one roll-out, on any device
    x = [torch.randn(s, generator=generator, dtype=torch.float32).to(device, dtype) for s in latent_shapes]
    held = distill_rollout(lambda x, t: roles.teacher(x, t, ctx_t), lambda x, t: roles.student(x, t, ctx_s), x,
                           sigmas, flow, loss_kind, per_step_backward, backward, weight)
    if ctx_s is not ctx_s_graph:
        # as a scalar <tokens, grad>, whose gradient w.r.t. tokens is exactly grad
        backward((ctx_s_graph.tokens * ctx_s.tokens.grad).sum())
    losses = held.tolist()      # one device sync per iteration, not one per roll-out step
    return StepOutput(loss=sum(losses) / len(losses), losses=losses)


def sft_step(roles: Roles, flow: FlowConvention, c_s: list[Tensor], x0: list[Tensor], shift: float,
             generator: torch.Generator | None = None) -> StepOutput:
    """The baseline D-OPSD is compared with: flow matching on the target latents (off-policy)."""
    u = torch.rand(len(x0), generator=generator)
    sigma = shift * u / (1 + (shift - 1) * u)
    eps = [torch.randn(xi.shape, generator=generator).to(xi.dtype) for xi in x0]
    x_t = [(1 - s) * xi + s * e for s, xi, e in zip(sigma.tolist(), x0, eps)]
    out = roles.student(x_t, flow.time(sigma), roles.context("student", c_s))
    target = [flow.target(xi, e) for xi, e in zip(x0, eps)]
    loss = torch.nn.functional.mse_loss(flat(out), flat(target))
    loss.backward()
    value = loss.item()     # the one device sync of the step
    return StepOutput(loss=value, losses=[value])

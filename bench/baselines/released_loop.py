"""The authors' released D-OPSD training loop (z-image-turbo_self-distill-vlm/train_dopsd.py), step for step.

What it does, as released (shared/reference/method.md sections 2-4):
- one diffusers ``ZImageTransformer2DModel`` carries two PEFT LoRA adapters with the same config, ``student``
  (trainable) and ``teacher`` (its EMA), switched per forward with ``set_adapter``; gradient checkpointing on;
- fresh noise every iteration; per roll-out step: ``x = x.detach().requires_grad_(True)``, teacher forward under
  ``no_grad`` with c_t, then student forward with c_s (both recompute the caption path), x0-space MSE with the
  teacher stopped, Euler step from the student's velocity in model time t = 1 - sigma;
- all K student graphs stay alive until one backward of the mean loss; clip 1.0, AdamW, then
  ``teacher = decay * teacher + (1 - decay) * student`` on the LoRA tensors.

It is the bench's baseline and, in tests/test_baseline_loop.py, the oracle dopsd_fast's trainer must agree with.
Precision follows the model's dtype everywhere (as DeepSpeed bf16 casts every parameter, method.md section 10),
except that the loss is reduced in fp32 and noise is drawn in fp32 then cast (the dopsd_fast convention, so the two
can be seeded alike). DeepSpeed's bf16 optimizer is modelled as it runs the released recipe: in a low-precision model
AdamW updates fp32 master copies of the student adapter (gradients cast to fp32 after the backward, clipped there)
and the module's adapter is rounded from them after each step, the policy dopsd_fast uses too (fp32 trainable
weights, compute in the model's dtype). The EMA stays on the module's adapter tensors, as released.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from dopsd_fast.models.z_image import ZImageConfig

ADAPTERS = ("student", "teacher")


def diffusers_transformer(arch: ZImageConfig, device="cpu", dtype: torch.dtype = torch.float32):
    """diffusers' Z-Image with our architecture (the config keys are the same), weights left uninitialised on
    ``meta`` and allocated on ``device``: the caller loads or randomises them."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel

    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(arch).items()}
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**kwargs)
    # nn.Module.to, not ModelMixin.to: the latter warns about keep-in-fp32 modules this model does not have
    return torch.nn.Module.to(model, dtype=dtype).to_empty(device=device)


def peft_name(ours: str, role: str) -> str:
    """``layers.0.attention.to_q.lora_A.student`` (ours) -> PEFT's ``layers.0.attention.to_q.lora_A.<role>.weight``."""
    return ours.rsplit(".", 1)[0] + f".{role}.weight"


class ReleasedLoop:
    def __init__(self, transformer, *, targets: list[str], rank: int, alpha: float, sigmas: list[float],
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float, grad_clip: float,
                 ema_decay: float, gradient_checkpointing: bool = True):
        """``transformer``: a diffusers ZImageTransformer2DModel holding the base weights; ``sigmas``: sigma_0 ..
        sigma_{K-1} (sigma_K = 0 is implied, as in the released schedule)."""
        from peft import LoraConfig

        self.model = transformer.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
        with warnings.catch_warnings():    # PEFT warns that a second adapter is being added: that is the design
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in ADAPTERS:
                self.model.add_adapter(config, adapter_name=name)
        self.student, self.teacher = (self.adapter(name) for name in ADAPTERS)
        assert [k.replace(".student.", ".teacher.") for k in self.student] == list(self.teacher)
        with torch.no_grad():   # the teacher starts as the student, i.e. as the exact base model
            for t, s in zip(self.teacher.values(), self.student.values()):
                t.copy_(s)
        self.model.set_adapter("student")   # also sets requires_grad on the student adapter only
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        self.timesteps = [1.0 - s for s in sigmas] + [1.0]      # model time t = 1 - sigma, t_K = 1
        self.grad_clip, self.ema_decay = grad_clip, ema_decay
        lowp = self.model.dtype != torch.float32
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.student.values()] if lowp else None
        self.optimizer = torch.optim.AdamW(self.masters or list(self.student.values()), lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)

    @torch.no_grad()
    def load_adapters(self, student: dict[str, Tensor], teacher: dict[str, Tensor]) -> None:
        """Start both adapters from dopsd_fast's tensors (our names, e.g. ``layers.0.attention.to_q.lora_A.student``)
        and the student's fp32 masters from the unrounded student."""
        for k, v in student.items():
            self.student[peft_name(k, "student")].copy_(v)
        for k, v in teacher.items():
            self.teacher[peft_name(k, "teacher")].copy_(v)
        if self.masters is not None:
            for m, k in zip(self.masters, self.student):
                m.copy_(student[k.replace(".student.weight", ".student")])

    def adapter(self, name: str) -> dict[str, torch.nn.Parameter]:
        """PEFT's tensors of one adapter: ``<module>.lora_A.<name>.weight`` [r, in], ``...lora_B...`` [out, r]."""
        return {k: p for k, p in self.model.named_parameters() if f".lora_A.{name}." in k or f".lora_B.{name}." in k}

    def forward_backward(self, c_s: list[Tensor], c_t: list[Tensor], latent_shape: tuple[int, ...], batch: int,
                         generator: torch.Generator | None = None) -> list[float]:
        """One roll-out with the single backward of the mean loss; returns loss_k per step.

        ``latent_shape``: (C, F, H, W) of the bucket all ``batch`` samples share; ``generator=None`` is the released
        code's global RNG."""
        dtype, device = self.model.dtype, self.model.device
        x = torch.randn((batch, *latent_shape), generator=generator, dtype=torch.float32).to(device, dtype)
        losses = []
        for t_now, t_next in zip(self.timesteps[:-1], self.timesteps[1:]):
            x = x.detach().requires_grad_(True)
            # t and dt live in the training dtype, as released (bf16: t = 0.1 is 0.10009765625)
            t = torch.full((batch,), t_now, dtype=dtype, device=device)
            dt = (torch.full((batch,), t_next, dtype=dtype, device=device) - t).view(-1, 1, 1, 1, 1)
            with torch.no_grad():
                self.model.set_adapter("teacher")
                v_t = torch.stack(self.model(list(x.unbind(0)), t, c_t, return_dict=False)[0])
            self.model.set_adapter("student")
            v_s = torch.stack(self.model(list(x.unbind(0)), t, c_s, return_dict=False)[0])
            sigma = (1 - t).view(-1, 1, 1, 1, 1)
            x0_t = x + sigma * v_t
            x0_s = x + sigma * v_s
            losses.append(F.mse_loss(x0_s.float(), x0_t.detach().float()))
            x = x + v_s * dt
        loss = torch.stack(losses).mean()
        loss.backward()
        return [v.item() for v in torch.stack(losses).detach()]

    def optimizer_step(self) -> float:
        params = list(self.student.values())
        if self.masters is not None:        # DeepSpeed's bf16 optimizer: fp32 gradients and update on the masters
            for m, p in zip(self.masters, params):
                m.grad, p.grad = p.grad.float(), None
            params = self.masters
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not None:
            with torch.no_grad():
                torch._foreach_copy_(list(self.student.values()), self.masters)
        self.ema_update()
        return float(norm)

    @torch.no_grad()
    def ema_update(self) -> None:
        d = self.ema_decay
        for t, s in zip(self.teacher.values(), self.student.values()):
            t.mul_(d).add_(s, alpha=1 - d)

    def iteration(self, c_s: list[Tensor], c_t: list[Tensor], latent_shape: tuple[int, ...], batch: int = 1,
                  generator: torch.Generator | None = None) -> list[float]:
        losses = self.forward_backward(c_s, c_t, latent_shape, batch, generator)
        self.optimizer_step()
        return losses

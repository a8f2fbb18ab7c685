"""fp32 master weights for a model that computes in bf16 (full fine-tuning outside DeepSpeed).

The model keeps its low-precision parameters, so forwards and backwards run in ``model.dtype``; the optimizer,
gradient clipping, the EMA teacher and checkpoints hold the fp32 masters instead. A bf16 weight cannot take an
AdamW update at lr 1e-5: most of them round away (issue 16: 5.6% of the entries moved in one step, fp32: all).

Gradients: each backward's low-precision gradient is added into the master's fp32 ``.grad`` as soon as autograd
has accumulated it (a post-accumulate-grad hook) and the low-precision one is freed, so the K + 1 backwards of a
D-OPSD iteration sum in fp32 and only one transient low-precision gradient per parameter exists at a time.
After the optimizer has changed the masters, ``copy_to_model`` rounds them into the model's parameters.
(DeepSpeed's bf16 optimizer does the same for its runs, which therefore never build this.)
"""
from __future__ import annotations

import torch
from torch import nn


class MasterWeights:
    def __init__(self, params: dict[str, nn.Parameter]):
        """``params``: name -> the model's trainable low-precision parameters."""
        self.model_params = list(params.values())
        self.masters = {n: nn.Parameter(p.detach().float().clone()) for n, p in params.items()}
        for p, m in zip(self.model_params, self.masters.values()):
            p.register_post_accumulate_grad_hook(_accumulate_into(m))

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.model_params, list(self.masters.values()))


def _accumulate_into(master: nn.Parameter):
    def hook(p: nn.Parameter) -> None:
        g = p.grad.float()
        if master.grad is None:
            master.grad = g
        else:
            master.grad.add_(g)
        p.grad = None
    return hook

"""Activation memory as autograd sees it: bytes of tensors saved for backward, live and peak.

Device-independent (works on CPU, where there is no allocator high-water mark), so the per-step-backward
saving can be measured in tests and in bench/ alike. Parameters saved by ops (e.g. a Linear's weight) are
not activations and are not counted.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class ActivationMeter:
    def __init__(self, *modules: nn.Module):
        self._param_storages = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self.live = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() in self._param_storages or t.device.type == "meta":
            return t
        n = t.untyped_storage().nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        box = _Saved(t)
        weakref.finalize(box, self._release, n)   # runs when autograd drops the saved tensor
        return box

    def _release(self, n: int) -> None:
        self.live -= n

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def __enter__(self) -> "ActivationMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

"""Triton kernels (tier 1a): one file per op, @triton.jit + launcher, tensors in and out, no autograd.

Shipped inside the wheel as ``dopsd_fast._kernels``: ``kernels`` is also a PyPI package that diffusers imports.
No kernels yet; ``dopsd_fast.ops.reference`` holds the pure-PyTorch spec of every op.
"""

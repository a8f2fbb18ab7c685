"""Shared test setup. The package is tested as installed (`pip install -e .`), never via sys.path tricks."""
import os

# Triton kernels must see the interpreter flag before any @triton.jit runs (there is no GPU in CI).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

"""`pytest bench/`: throughput and memory, ours and the baseline measured in the same run."""
import os

# Triton on CPU tensors is its interpreter: op benches that ask for Triton run it there (auto never chooses it)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


"""`dopsd` under a launcher, for the multi-process tests: skips DeepSpeed's CPU shm-op JIT build (~25 s per fresh
extensions dir; gloo does the collectives) and keeps each rank on one thread (2 ranks share 2 cores)."""
import sys

import deepspeed.comm  # noqa: F401  (registers deepspeed.comm.torch)
import torch

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
torch.set_num_threads(1)

from dopsd_fast.cli import run  # noqa: E402

run(sys.argv[1:])

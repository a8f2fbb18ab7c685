"""Host time of one D-OPSD iteration, ours vs the released loop: the cost a GPU waits on when its kernels are short.

At 512² on an H100 an iteration of either side takes about as long as at 1024² (bench/README.md): host time
(Python, autograd, dispatch, launches) bounds it. This bench measures that part on the CPU, where it can be
isolated: the Z-Image 6B's block structure (30 layers + 2 + 2 refiners) at a tiny width, so that the arithmetic
is negligible and an iteration's thread CPU time is the host's work. Per configuration (bench_e2e's sides and
configurations; ours on the cpp ops, one dispatcher op per fused epilogue as on CUDA, the ops without
one on the reference): dispatcher ops per
iteration (counted under a TorchDispatchMode, a separate iteration) and the median thread CPU seconds of the timed
iterations. Equal losses across the sides are bench_e2e's job (same builders).
``--benchmark-disable`` (CI) runs the 2-layer smoke model once per configuration.
"""
from __future__ import annotations

import collections
import statistics
import time

import pytest
import torch
from bench_e2e import SMOKE, Case, Config, build
from torch.utils._python_dispatch import TorchDispatchMode

from dopsd_fast.models.z_image import ZImageConfig

BLOCKS_6B = ZImageConfig(dim=64, n_layers=30, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                         axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
CASE = Case("cpu", BLOCKS_6B, (16, 1, 16, 16), (7, 20), 4, torch.float32, 5)
CONFIGS = [Config("baseline", "on", "default"), Config("baseline", "off", "default"),
           Config("ours", "full", "cpp"), Config("ours", "none", "cpp")]


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def test_host_time(benchmark):
    from dopsd_fast.ops._dispatch import native_available
    if not native_available():
        pytest.skip("dopsd_fast._C is not built (ours runs its cpp ops here)")
    case = SMOKE if benchmark.disabled else CASE
    sides = build(case)
    g = torch.Generator().manual_seed(1)
    c_s, c_t = ([torch.randn(n, case.arch.cap_feat_dim, generator=g)] for n in case.caption_tokens)
    runs = {c.label: {"seconds": [], "ops": 0} for c in CONFIGS}

    def iteration(config: Config, seed: int):
        return sides[config.side].iteration(config, c_s, c_t, case.latent, torch.Generator().manual_seed(seed))

    for config in CONFIGS:
        sides[config.side].restore()
        iteration(config, 2)                                  # warm-up
        with OpCount() as count:
            iteration(config, 2)
        runs[config.label].update(ops=sum(count.ops.values()), top=dict(count.ops.most_common(8)))

    def cycle():                                              # round-robin: machine noise hits all alike
        for config in CONFIGS:
            t0 = time.thread_time()
            iteration(config, 3)
            runs[config.label]["seconds"].append(time.thread_time() - t0)

    benchmark.pedantic(cycle, rounds=case.rounds, warmup_rounds=0, iterations=1)
    lines = [f"host time per iteration, {case.arch.n_layers} + 2 x {case.arch.n_refiner_layers} blocks at width "
             f"{case.arch.dim}, 1 thread, {case.rounds} rounds (thread CPU seconds, median)",
             f"{'configuration':<32} {'dispatcher ops':>14} {'CPU s':>7}"]
    for label, r in runs.items():
        r["cpu_seconds_median"] = statistics.median(r["seconds"])
        lines.append(f"{label:<32} {r['ops']:>14} {r['cpu_seconds_median']:>7.3f}")
    benchmark.extra_info.update(case=repr(case.arch), runs=runs, table=lines)
    print("\n" + "\n".join(lines))
    assert all(r["ops"] > 0 for r in runs.values())

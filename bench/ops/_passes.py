"""Shared timing for the op benches: one pass (fwd | bwd | full) timed, rate and peak memory recorded."""
import torch

CUDA = torch.cuda.is_available()
ROUNDS = 20 if CUDA else 1


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def time_pass(benchmark, pass_: str, fwd, full, bwd, setup_bwd, work: float, unit: str, rounds: int = ROUNDS) -> None:
    """Time ``fwd`` / ``full``, or ``bwd`` on a graph built by ``setup_bwd`` outside the timed region.

    ``work`` is the pass's FLOPs (unit "TFLOP/s") or bytes moved (unit "GB/s"); the achieved rate goes to extra_info.
    ``rounds``: default 20 on CUDA, 1 on CPU (a smoke size); a CPU size that is measured asks for more.
    """
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    warmup = 1 if CUDA else 0
    if pass_ == "bwd":
        benchmark.pedantic(bwd, setup=setup_bwd, rounds=rounds, warmup_rounds=warmup)
    else:
        benchmark.pedantic(fwd if pass_ == "fwd" else full, rounds=rounds, warmup_rounds=warmup)
    benchmark.extra_info["flops" if unit == "TFLOP/s" else "bytes"] = work
    if benchmark.stats is not None:   # None under --benchmark-disable
        benchmark.extra_info[unit] = work / benchmark.stats.stats.median / (1e12 if unit == "TFLOP/s" else 1e9)
    if CUDA:
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()

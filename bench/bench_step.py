"""One D-OPSD iteration (K=4, tiny Z-Image, CPU): per-step backward (ours) vs holding K graphs (released loop).

Both variants run in the same session and group, so pytest-benchmark's table gives the time ratio; the
activation-memory peak of each (bytes saved for backward, see dopsd_fast.train.memory) goes to extra_info and
the ratio is printed.
"""
import pytest

from dopsd_fast.train.memory import ActivationMeter
from dopsd_fast.testing import randomize_adapters, tiny_trainer

VARIANTS = {"per_step_backward": ["method.per_step_backward=true"],
            "hold_all_graphs": ["method.per_step_backward=false"]}
_peaks: dict[str, int] = {}


@pytest.mark.benchmark(group="dopsd_step_tiny_cpu")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dopsd_step(benchmark, tmp_path, variant):
    tr = tiny_trainer(tmp_path, *VARIANTS[variant], "train.batch_size=2")
    randomize_adapters(tr)

    def step():
        tr.forward_backward_step(next(tr.stream))
        tr.optimizer.zero_grad(set_to_none=True)

    with ActivationMeter(tr.model) as meter:
        step()
    _peaks[variant] = meter.peak
    benchmark.extra_info["peak_activation_bytes"] = meter.peak
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    if variant == "hold_all_graphs":
        ratio = _peaks["hold_all_graphs"] / _peaks["per_step_backward"]
        benchmark.extra_info["activation_ratio_hold_all_over_per_step"] = ratio
        print(f"\npeak activations: hold-all {_peaks['hold_all_graphs']:,} B / per-step {_peaks['per_step_backward']:,} B"
              f" = {ratio:.2f}x")

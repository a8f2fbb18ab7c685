"""dopsd_step with method.packed_forward (teacher + student in one forward) == the two per-role forwards."""
import pytest
import torch

from dopsd_fast.testing import randomize_adapters, tiny_trainer
from dopsd_fast.train.config import ConfigError, load_config


def one_step(tmp_path, packed: bool, *overrides: str, preset: str = "tiny-cpu"):
    tr = tiny_trainer(tmp_path, f"method.packed_forward={str(packed).lower()}", "train.batch_size=3", *overrides,
                      preset=preset)
    randomize_adapters(tr)
    out = tr.forward_backward_step(next(tr.stream))
    assert all(p.grad is None for p in tr.roles.ema.teacher), "the teacher adapter gets no gradient"
    return out, {k: p.grad.clone() for k, p in tr.roles.trainable.items()}


@pytest.mark.parametrize("preset, overrides", [
    ("tiny-cpu", ("method.per_step_backward=true",)),
    ("tiny-cpu", ("method.per_step_backward=false", "model.checkpointing=full")),
    ("tiny-klein-cpu", ("method.per_step_backward=true",)),     # teacher with reference tokens, student without
])
def test_packed_step_equals_two_forward_step(tmp_path, preset, overrides):
    two, g_two = one_step(tmp_path / "two", False, *overrides, preset=preset)
    packed, g_packed = one_step(tmp_path / "packed", True, *overrides, preset=preset)
    assert packed.losses == pytest.approx(two.losses, rel=1e-5)
    assert set(g_packed) == set(g_two)
    for name, g in g_two.items():
        assert g.abs().sum() > 0, name
        # fp32: rtol 1e-5, atol 1e-5 of the largest element (sums over rows in another order; see test_z_image_packed)
        torch.testing.assert_close(g_packed[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_packed_forward_needs_lora_roles():
    with pytest.raises(ConfigError, match="method.packed_forward: needs adapter.mode=lora"):
        load_config("tiny-cpu", ["method.packed_forward=true", "adapter.mode=full"])

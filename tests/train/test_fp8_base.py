"""model.base_precision=fp8: the config's refusals and a short tiny-preset run on the CPU emulation."""
import math

import pytest
import torch

from dopsd_fast.nn.lora_linear import LoRALinear
from dopsd_fast.testing import tiny_trainer
from dopsd_fast.train.config import ConfigError, load_config


@pytest.mark.parametrize("overrides,match", [
    (["model.base_precision=fp8", "adapter.mode=full"], r"model.base_precision: .*adapter.mode=full.*adapter.mode=lora"),
    (["model.base_precision=fp8", "deepspeed.stage=2"], r"model.base_precision: .*remove deepspeed.stage"),
    (["model.fp8_input_grad=e5m2"], r"model.fp8_input_grad: .*set model.base_precision=fp8"),
    (["model.base_precision=fp16"], r"model.base_precision: 'fp16' is not one of 'bf16', 'fp8'"),
], ids=["full", "deepspeed", "e5m2-without-fp8", "unknown"])
def test_config_refusals_name_key_and_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny-cpu", overrides)


def base_weight_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("input_grad", ["bf16", "e5m2"])
def test_tiny_run_trains_on_an_fp8_base(tmp_path, input_grad):
    common = ("model.dtype=bf16", "train.steps=3", "train.checkpoint_every=1000", "optim.lr=1e-2")
    bf16 = tiny_trainer(tmp_path / "bf16", *common)
    fp8 = tiny_trainer(tmp_path / "fp8", *common, "model.base_precision=fp8", f"model.fp8_input_grad={input_grad}")
    lora = [m for m in fp8.model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == len(fp8.roles.targets) and all(m.weight.dtype == torch.float8_e4m3fn for m in lora)
    assert base_weight_bytes(fp8.model) * 2 == base_weight_bytes(bf16.model)
    before = {k: p.detach().clone() for k, p in fp8.roles.trainable.items()}
    losses = [r.loss for r in fp8.train()]
    assert all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in fp8.roles.trainable.values())
    assert any(not torch.equal(p, before[k]) for k, p in fp8.roles.trainable.items()), "no LoRA weight moved"
    # the same run on the bf16 base: FP8 moves the first loss by well under its size (the adapters start at B = 0)
    first_bf16 = bf16.train()[0].loss
    assert losses[0] == pytest.approx(first_bf16, rel=0.1)

"""train.device: validated with the config, resolved before any weights exist, and followed by every part."""
import pytest
import torch

from dopsd_fast.train.build import resolve_device
from dopsd_fast.train.config import ConfigError, load_config
from dopsd_fast.testing import tiny_trainer


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CPU", ""])
def test_bad_device_names_the_key(bad):
    with pytest.raises(ConfigError, match="train.device"):
        load_config("tiny-cpu", [f"train.device={bad}"])


def test_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_is_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)


def test_cuda_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device.*no CUDA device"):
        resolve_device("cuda")


def test_trainer_parts_on_the_chosen_device(tmp_path):
    trainer = tiny_trainer(tmp_path, "train.device=cpu", "train.steps=1")
    assert trainer.device == torch.device("cpu")
    assert {p.device for p in trainer.model.parameters()} == {torch.device("cpu")}
    assert {p.device for p in trainer.roles.trainable.values()} == {torch.device("cpu")}

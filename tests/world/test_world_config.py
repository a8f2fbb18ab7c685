"""The world preset validates, and a half-world config or a missing turbo path is refused before anything is built."""
import pytest

from dopsd_fast.cli import main
from dopsd_fast.train.build import check_buildable
from dopsd_fast.train.config import ConfigError, load_config


def test_world_preset_needs_the_shipped_turbo():
    cfg = load_config("world-demo")
    assert (cfg.data.kind, cfg.context.kind, cfg.adapter.mode) == ("world", "world", "lora")
    with pytest.raises(ConfigError, match="model.pretrained"):
        check_buildable(cfg)
    check_buildable(load_config("world-demo", ["model.pretrained=some/turbo"]))
    check_buildable(load_config("world-demo", ["model.pretrained=some/turbo", "data.path=fep"]))   # a concept's word
    with pytest.raises(ConfigError, match="data.path: 'glorp' names no concept"):
        check_buildable(load_config("world-demo", ["model.pretrained=some/turbo", "data.path=glorp"]))


@pytest.mark.parametrize("override", ["data.kind=synthetic", "context.kind=toy"])
def test_world_data_and_context_go_together(override):
    with pytest.raises(ConfigError, match="both set to world"):
        check_buildable(load_config("world-demo", ["model.pretrained=some/turbo", override]))


@pytest.fixture
def nothing_may_load(monkeypatch):
    """`dopsd demo` with bad arguments must fail before it loads the world's weights and runs the gates."""
    def refuse(*_, **__):
        raise AssertionError("the demo started loading weights before checking its arguments")
    monkeypatch.setattr("dopsd_fast.world.demo.load_encoders", refuse)
    monkeypatch.setattr("dopsd_fast.world.demo.load_dit", refuse)
    monkeypatch.setattr("dopsd_fast.world.continual.load_encoders", refuse)


@pytest.mark.parametrize("args, named", [(["--set", "train.stepz=5"], "train.stepz"),
                                         (["--set", "data.kind=synthetic"], "data.kind"),
                                         (["--iterations", "0"], "error: --iterations: must be >= 1, got 0"),   # the flag typed
                                         (["--eval-prompts", "0"], "--eval-prompts"),
                                         (["--continual", "--set", "train.stepz=5"], "train.stepz")])
def test_demo_bad_arguments_fail_before_anything_is_built(tmp_path, capsys, nothing_may_load, args, named):
    assert main(["demo", "--out", str(tmp_path / "demo"), *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("dopsd: error:") and named in captured.err
    assert "gates" not in captured.out and not (tmp_path / "demo").exists()

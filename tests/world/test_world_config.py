"""The world preset validates, and a half-world config or a missing turbo path is refused before anything is built."""
import pytest

from dopsd_fast.train.build import check_buildable
from dopsd_fast.train.config import ConfigError, load_config


def test_world_preset_needs_the_shipped_turbo():
    cfg = load_config("world-demo")
    assert (cfg.data.kind, cfg.context.kind, cfg.adapter.mode) == ("world", "world", "lora")
    with pytest.raises(ConfigError, match="model.pretrained"):
        check_buildable(cfg)
    check_buildable(load_config("world-demo", ["model.pretrained=some/turbo"]))


@pytest.mark.parametrize("override", ["data.kind=synthetic", "context.kind=toy"])
def test_world_data_and_context_go_together(override):
    with pytest.raises(ConfigError, match="both set to world"):
        check_buildable(load_config("world-demo", ["model.pretrained=some/turbo", override]))

"""FLOP accounting matches the tables in models.md §2.9."""
import pytest

from dopsd_fast.metrics.flops import zimage_forward, zimage_image_tokens
from dopsd_fast.models.z_image import ZImageConfig

TURBO = ZImageConfig()


@pytest.mark.parametrize("res, caption, tflop, share", [
    (1024, 128, 56.6, 0.15), (1024, 512, 62.5, 0.17), (512, 128, 13.7, 0.05), (512, 512, 18.5, 0.06)])
def test_zimage_forward_matches_models_md(res, caption, tflop, share):
    f = zimage_forward(TURBO, zimage_image_tokens(res, res), caption)
    assert f.total / 1e12 == pytest.approx(tflop, abs=0.05)
    assert f.attention / f.total == pytest.approx(share, abs=0.006)   # the table gives whole percents


def test_dense_flops_per_token_per_block():
    f = zimage_forward(ZImageConfig(n_layers=1, n_refiner_layers=0), 32, 0)
    assert f.dense / 32 == pytest.approx(353.9e6, rel=1e-3)

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


def test_dopsd_iteration_full_is_k_times_teacher_plus_three_student_forwards():
    from dopsd_fast.metrics.flops import dopsd_iteration
    n = zimage_image_tokens(1024, 1024)
    fwd = zimage_forward(TURBO, n, 128).total
    assert dopsd_iteration(TURBO, n, 128, 128, 4).total == pytest.approx(4 * 4 * fwd)


def test_dopsd_iteration_lora_backward_is_cheaper_than_two_forwards():
    from dopsd_fast.metrics.flops import dopsd_iteration, zimage_lora
    n = zimage_image_tokens(512, 512)
    fwd = zimage_forward(TURBO, n, 128)
    lora = zimage_lora(TURBO, n, 128, 64).total
    it = dopsd_iteration(TURBO, n, 128, 128, 1, lora_rank=64).total
    backward = it - 2 * (fwd.total + lora)
    assert backward == pytest.approx(fwd.dense + 2 * fwd.attention + 2 * lora)
    assert fwd.total < backward < 2 * fwd.total
    # adapter FLOPs per token and block: 2 r (8 D + 3 (D + H)) with the official targets
    assert zimage_lora(ZImageConfig(n_layers=1, n_refiner_layers=0), 32, 0, 64).total / 32 == \
        2 * 64 * (8 * 3840 + 3 * (3840 + 10240))


def test_verl_omni_convention_factors_6_and_12():
    """VeRL-Omni's counter, written out for Z-Image's single stream: per layer, dense 6 (trained) or 2 (forward
    only) FLOPs per weight per token, non-causal attention 12 or 4 x s^2 x (heads x head_dim); refiners on their
    own token lists; K roll-out steps of teacher forward + student forward/backward."""
    from dopsd_fast.metrics.flops import verl_omni_iteration
    from dopsd_fast.models.z_image import SEQ_MULTIPLE, round_up

    d, hidden = TURBO.dim, int(TURBO.dim / 3 * 8)
    weights = 4 * d * d + 3 * d * hidden

    def layer_stack(lengths: list[tuple[int, int]], dense: int, attn: int) -> float:     # (layers, tokens)
        return sum(n * (dense * weights * s + attn * s * s * d) for n, s in lengths)

    def model(image, caption, dense, attn):
        ni, lc = round_up(image, SEQ_MULTIPLE), round_up(caption, SEQ_MULTIPLE)
        r = TURBO.n_refiner_layers
        return layer_stack([(r, ni), (r, lc), (TURBO.n_layers, ni + lc)], dense, attn)

    n, K = zimage_image_tokens(1024, 1024), 4
    want = K * (model(n, 704, 2, 4) + model(n, 128, 6, 12))
    got = verl_omni_iteration(zimage_forward(TURBO, n, 704), zimage_forward(TURBO, n, 128), K).total
    assert got == pytest.approx(want, rel=1e-12)

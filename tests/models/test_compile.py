"""THE COMPILE TEST (marker ``compile``; ~50 s of CPU on one core with an empty Inductor cache, nearly all compiling).

model.compile=blocks (models/compile.py) on the tiny-cpu preset, K = 2 roll-out steps, per-step backward: the
losses and every adapter gradient equal the eager run's up to fp32 rounding, with checkpointing none and full
(eager checkpointing around the compiled block, whose recompute reruns the compiled forward), and the blocks trace
without a graph break. In the same test, reusing its compilations (a second test would compile again): one model
switched by use_compiled (bench/bench_e2e.py's one model for every configuration) computes the eager run bit for
bit when off and the compiled run bit for bit when on again.

Tolerance (fp32): Inductor writes its own C++ kernels for the elementwise work between the GEMMs and the custom ops
(LoRA's scale-and-add, SwiGLU, the unmodulated blocks' RMSNorm: fused, vectorised, sums in another order, FMAs
contracted), so each such value may differ from eager by an ulp or two (eps = 1.2e-7), and the differences pass
through 2 roll-out steps and their backwards. Measured here: losses to 4e-7 relative, gradients to 7e-7 in relative
L2 norm per tensor. Asserted: 1e-5 for both (~80 eps), loose enough for another CPU's vector width (AVX2 / AVX-512
reduce in different orders), tight enough that a wrong graph (a dropped term, a stale weight) fails by orders of
magnitude: at this size every adapter's gradient is O(1) relative to the differences.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from dopsd_fast.models.compile import compile_blocks, is_compiled, use_compiled
from dopsd_fast.testing import randomize_adapters, tiny_trainer

pytestmark = pytest.mark.compile
RTOL = 1e-5


@pytest.fixture
def fresh_dynamo(tmp_path, monkeypatch):
    """Inductor's on-disk cache under this test's tmp dir; dynamo's in-process caches cleared before and after."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def one_iteration(path, compile: str, checkpointing: str):
    tr = tiny_trainer(path, "method.sigmas=[1.0,0.5]", f"model.compile={compile}",
                      f"model.checkpointing={checkpointing}")
    randomize_adapters(tr)
    out = tr.forward_backward_step(next(tr.stream))
    grads = {k: p.grad.clone() for k, p in tr.roles.trainable.items() if p.grad is not None}
    return tr, out, grads


def test_compiled_blocks_equal_eager_within_fp32_rounding(tmp_path, fresh_dynamo):
    runs, eager_runs = {}, {}
    for checkpointing in ("none", "full"):
        _, eager, g_eager = one_iteration(tmp_path / f"eager-{checkpointing}", "none", checkpointing)
        tr, compiled, g_compiled = one_iteration(tmp_path / f"blocks-{checkpointing}", "blocks", checkpointing)
        blocks = [m for m in tr.model.modules() if isinstance(m, tr.model.repeated_blocks)]
        assert len(blocks) == 4 and all(is_compiled(b) for b in blocks)     # 1 context, 1 noise refiner, 2 layers
        assert len(compiled.losses) == 2
        assert compiled.losses == pytest.approx(eager.losses, rel=RTOL, abs=0)
        assert set(g_compiled) == set(g_eager) and g_eager
        worst = max(((g_compiled[k] - g).norm() / g.norm()).item() for k, g in g_eager.items())
        assert worst <= RTOL, f"{checkpointing}: largest relative gradient difference {worst:.2e}"
        print(f"checkpointing={checkpointing}: losses {eager.losses} vs {compiled.losses}, worst grad {worst:.2e}")
        runs[checkpointing] = compiled.losses, g_compiled
        eager_runs[checkpointing] = eager.losses, g_eager
    assert not counters["graph_break"], dict(counters["graph_break"])
    # one model switched off and on again (use_compiled): eager bit for bit, then compiled bit for bit, no recompiling
    tr = tiny_trainer(tmp_path / "switched", "method.sigmas=[1.0,0.5]", "model.compile=blocks",
                      "model.checkpointing=full")
    randomize_adapters(tr)
    batch, noise, graphs = next(tr.stream), tr.noise.get_state(), counters["stats"]["unique_graphs"]
    blocks = [m for m in tr.model.modules() if isinstance(m, tr.model.repeated_blocks)]
    for on, (want_losses, want_grads) in ((False, eager_runs["full"]), (True, runs["full"])):
        assert use_compiled(tr.model, on) == 4 and [is_compiled(b) for b in blocks] == [on] * 4
        tr.noise.set_state(noise)
        for p in tr.roles.trainable.values():
            p.grad = None
        out = tr.forward_backward_step(batch)
        assert out.losses == want_losses, f"compiled={on}"
        for name, g in want_grads.items():
            torch.testing.assert_close(tr.roles.trainable[name].grad, g, rtol=0, atol=0, msg=f"compiled={on}: {name}")
    assert counters["stats"]["unique_graphs"] == graphs > 0      # the kept compiled code served the second switch
    # full checkpointing's recompute reruns the same compiled forward: bitwise what no checkpointing computes
    (losses_none, g_none), (losses_full, g_full) = runs["none"], runs["full"]
    assert losses_full == losses_none
    for name, g in g_none.items():
        torch.testing.assert_close(g_full[name], g, rtol=0, atol=0, msg=name)


def test_compile_keeps_state_dict_keys_and_none_compiles_nothing():
    from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer

    model = ZImageTransformer(ZImageConfig(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                           cap_feat_dim=8, axes_dims=(4, 6, 6), axes_lens=(64, 16, 16)))
    keys = list(model.state_dict())
    assert compile_blocks(model, "none") == 0 and not any(is_compiled(m) for m in model.modules())
    assert use_compiled(model, True) == 0 and not any(is_compiled(m) for m in model.modules())   # nothing to switch
    assert compile_blocks(model, "blocks") == 3      # wraps lazily: nothing is compiled until a block runs
    assert list(model.state_dict()) == keys
    assert use_compiled(model, False) == 3 and not any(is_compiled(m) for m in model.modules())
    assert use_compiled(model, True) == 3 and sum(map(is_compiled, model.modules())) == 3
    with pytest.raises(ValueError, match="compile mode"):
        compile_blocks(model, "model")


def test_config_key():
    from dopsd_fast.train.config import ConfigError, load_config

    assert load_config("tiny-cpu").model.compile == "none"
    assert load_config("tiny-cpu", ["model.compile=blocks"]).model.compile == "blocks"
    with pytest.raises(ConfigError, match="model.compile"):
        load_config("tiny-cpu", ["model.compile=graph"])
    with pytest.raises(ConfigError, match="model.compile"):
        load_config("tiny-cpu", ["model.compile=blocks", "deepspeed.stage=3"])

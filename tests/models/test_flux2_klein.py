"""Parity of our packed FLUX.2 [klein] transformer with diffusers' Flux2Transformer2DModel (fp32 and bf16, CPU)."""

import copy
import math

import pytest
import torch

from dopsd_fast.models.checkpointing import CheckpointPlan
from dopsd_fast.models.flux2_klein import (KLEIN_4B, KLEIN_9B, Flux2KleinConfig, Flux2KleinTransformer,
                                           ReferenceCondition, grid_positions, text_positions)

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel  # noqa: E402

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=256, mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False)
TOL = dict(rtol=1e-5, atol=1e-5)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights near 1) so nothing stays at its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / math.sqrt(p.shape[1]) if p.dim() >= 2 else 1.0 + 0.2 * noise)


@pytest.fixture(scope="module")
def models():
    theirs = Flux2Transformer2DModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})
    randomize_(theirs)
    ours = Flux2KleinTransformer(Flux2KleinConfig(**TINY))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def reference(theirs, x, t, text, refs=()):
    """diffusers, one sample at a time: hidden = [target, refs] with ids (0,h,w,0) / (10+10k,h,w,0), sliced back."""
    c, h, w = x.shape
    tokens = [x.flatten(1).T] + [r.flatten(1).T for r in refs]
    ids = [grid_positions(h, w)] + [grid_positions(r.shape[1], r.shape[2], 10 + 10 * k) for k, r in enumerate(refs)]
    out = theirs(hidden_states=torch.cat(tokens)[None], encoder_hidden_states=text[None], timestep=t.reshape(1),
                 img_ids=torch.cat(ids)[None], txt_ids=text_positions(len(text))[None], return_dict=False)[0]
    return out[0, : h * w].T.reshape(-1, h, w)


def make(seed, shapes, text_lens, ref_shapes=None):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(s, generator=g) for s in shapes]
    text = [torch.randn(n, TINY["joint_attention_dim"], generator=g) for n in text_lens]
    refs = [[torch.randn(s, generator=g) for s in rs] for rs in (ref_shapes or [[] for _ in shapes])]
    t = torch.rand(len(shapes), generator=g)
    return x, t, text, refs


CASES = {
    "batch1": ([(16, 4, 6)], [7], None),
    "batch3_mixed_sizes": ([(16, 4, 4), (16, 3, 5), (16, 6, 2)], [5, 9, 12], None),
    "reference_tokens": ([(16, 4, 4), (16, 2, 6)], [6, 11], [[(16, 4, 4)], [(16, 3, 3), (16, 2, 5)]]),
    "reference_on_one_sample": ([(16, 4, 4), (16, 3, 3)], [6, 8], [[], [(16, 5, 3)]]),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_diffusers(models, case):
    ours, theirs = models
    x, t, text, refs = make(1, *CASES[case])
    conds = [ReferenceCondition(s, r) if r else s for s, r in zip(text, refs)]
    with torch.no_grad():
        got = ours([xi.clone().fill_(float("nan")).copy_(xi) for xi in x], t, cap_feats=conds)
        want = [reference(theirs, xi, ti, s, r) for xi, ti, s, r in zip(x, t, text, refs)]
    for a, b, xi in zip(got, want, x):
        assert a.shape == xi.shape
        torch.testing.assert_close(a, b, **TOL)


def test_bf16_error_is_no_worse_than_diffusers(models):
    """bf16 judged against the fp32 result: our error at most 1.5x diffusers' own bf16 error (observed ~1x).
    diffusers rounds t and 1000 t to bf16 before the sinusoid (we keep fp32): pick t where both are exact."""
    ours, theirs = (copy.deepcopy(m).to(torch.bfloat16) for m in models)
    x, _, text, refs = make(2, *CASES["reference_tokens"])
    t = torch.tensor([0.25, 0.5])
    conds = [ReferenceCondition(s, r).to(torch.bfloat16) for s, r in zip(text, refs)]
    with torch.no_grad():
        exact = [reference(models[1], xi, ti, s, r) for xi, ti, s, r in zip(x, t, text, refs)]
        got = ours([xi.bfloat16() for xi in x], t, cap_feats=conds)
        want = [reference(theirs, xi.bfloat16(), ti, s.bfloat16(), [r.bfloat16() for r in rs])
                for xi, ti, s, rs in zip(x, t, text, refs)]
    for a, b, e in zip(got, want, exact):
        assert a.dtype == torch.bfloat16
        ours_err, theirs_err = (a.float() - e).abs().max(), (b.float() - e).abs().max()
        assert ours_err <= 1.5 * theirs_err, (ours_err, theirs_err)


def test_gradients_match_diffusers(models):
    """Backward through every block: input, text and weight gradients equal diffusers' (fp32)."""
    ours, theirs = (copy.deepcopy(m) for m in models)
    x, t, text, refs = make(3, [(16, 3, 4), (16, 2, 2)], [5, 6], [[(16, 2, 3)], []])
    x1 = [xi.clone().requires_grad_(True) for xi in x]
    x2 = [xi.clone().requires_grad_(True) for xi in x]
    s1 = [s.clone().requires_grad_(True) for s in text]
    s2 = [s.clone().requires_grad_(True) for s in text]
    w = [torch.randn(xi.shape) for xi in x]
    conds = [ReferenceCondition(s, r) if r else s for s, r in zip(s1, refs)]
    sum((o * wi).sum() for o, wi in zip(ours(x1, t, cap_feats=conds), w)).backward()
    sum((reference(theirs, xi, ti, s, r) * wi).sum() for xi, ti, s, r, wi in zip(x2, t, s2, refs, w)).backward()
    for a, b in zip(x1 + s1, x2 + s2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(models):
    ours = copy.deepcopy(models[0])
    x, t, text, refs = make(4, *CASES["reference_tokens"])
    conds = [ReferenceCondition(s, r) for s, r in zip(text, refs)]
    grads = []
    for mode in ("none", "full"):
        ours.zero_grad()
        ours.checkpointing = CheckpointPlan(mode)
        sum(o.square().sum() for o in ours(x, t, cap_feats=conds)).backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_context_reuse_equals_full_forward(models):
    """encode_context once, then forward with it for two time steps = forward from the raw features."""
    ours = models[0]
    x, t, text, refs = make(5, *CASES["reference_tokens"])
    conds = [ReferenceCondition(s, r) for s, r in zip(text, refs)]
    with torch.no_grad():
        ctx = ours.encode_context(conds)
        for tt in (t, 1 - t):
            for a, b in zip(ours(x, tt, context=ctx), ours(x, tt, cap_feats=conds)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cfg, params, tensors", [(KLEIN_4B, 3_875_544_576, 169), (KLEIN_9B, 9_078_581_248, 233)])
def test_parameter_counts_match_models_md(cfg, params, tensors):
    """models.md 3.9 (params) and 3.8 (169 diffusers tensors for 4B; 9B: 9 + 8 x 16 + 24 x 4)."""
    with torch.device("meta"):
        model = Flux2KleinTransformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == tensors


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="patch_size"):
        Flux2KleinTransformer(Flux2KleinConfig(**{**TINY, "patch_size": 2}))
    with pytest.raises(ValueError, match="unknown Flux2KleinConfig keys"):
        Flux2KleinConfig.from_dict({"num_layerz": 2})
    model = Flux2KleinTransformer(Flux2KleinConfig(**TINY))
    x, t, text, _ = make(6, [(16, 2, 2)], [3])
    with pytest.raises(ValueError, match="exactly one"):
        model(x, t)
    with pytest.raises(ValueError, match="1 latents but 2 prompts"):
        model(x, t, cap_feats=text * 2)


@pytest.mark.parametrize("cfg, target, refs, tflop, attention_pct", [
    (KLEIN_4B, 4096, 0, 34.8, 19), (KLEIN_4B, 4096, 4096, 76.7, 30), (KLEIN_4B, 1024, 0, 10.2, 7),
    (KLEIN_4B, 1024, 1024, 17.7, 11), (KLEIN_9B, 4096, 0, 75.5, 15), (KLEIN_9B, 4096, 4096, 161.3, 25),
    (KLEIN_9B, 1024, 0, 22.7, 5), (KLEIN_9B, 1024, 1024, 39.2, 9)])
def test_forward_flops_match_models_md(cfg, target, refs, tflop, attention_pct):
    from dopsd_fast.metrics.flops import klein_forward
    f = klein_forward(cfg, target, 512, refs)
    assert round(f.total / 1e12, 1) == tflop and round(100 * f.attention / f.total) == attention_pct

"""Parity of our packed Z-Image S3-DiT with diffusers' padded ZImageTransformer2DModel (fp32, CPU)."""

import copy
import math

import pytest
import torch

from dopsd_fast.models import checkpointing
from dopsd_fast.models.checkpointing import CheckpointPlan
from dopsd_fast.models.z_image import CaptionContext, ZImageConfig, ZImageTransformer

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel  # noqa: E402

TINY = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
    n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=(8, 12, 12), axes_lens=(256, 64, 64),
    rope_theta=256.0, t_scale=1000.0,
)
TOL = dict(rtol=1e-5, atol=1e-5)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter so nothing stays at its init zeros/ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2 and "pad_token" not in name:
                p.copy_(noise / math.sqrt(p.shape[1]))  # weights: unit-variance outputs
            elif "norm" in name or name.startswith("cap_embedder.0"):
                p.copy_(1.0 + 0.2 * noise)  # RMSNorm weights
            else:
                p.copy_(0.5 * noise)  # biases and learned pad tokens


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    theirs = ZImageTransformer2DModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})
    randomize_(theirs)
    ours = ZImageTransformer(ZImageConfig(**TINY))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def make_inputs(cap_lens, latent_shapes, ts, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(s, generator=g) for s in latent_shapes]
    caps = [torch.randn(n, TINY["cap_feat_dim"], generator=g) for n in cap_lens]
    return x, torch.tensor(ts, dtype=torch.float32), caps


def reference(theirs, x, t, caps):
    return theirs(x, t, caps, return_dict=False)[0]


CASES = {
    "batch1": ([20], [(16, 1, 8, 8)], [0.3]),
    "batch3_mixed_caption_lengths": ([7, 33, 64], [(16, 1, 8, 8)] * 3, [0.0, 0.45, 0.9]),
    "image_pad_tokens": ([7, 40], [(16, 1, 6, 10), (16, 1, 8, 12)], [0.2, 0.7]),  # 15 and 24 image tokens
}


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_diffusers(models, case):
    ours, theirs = models
    x, t, caps = make_inputs(*CASES[case])
    with torch.no_grad():
        got, want = ours(x, t, cap_feats=caps), reference(theirs, x, t, caps)
    assert len(got) == len(want)
    for a, b, xi in zip(got, want, x):
        assert a.shape == xi.shape
        torch.testing.assert_close(a, b, **TOL)


def test_bf16_forward_matches_diffusers(models):
    """Same numerics in bf16 (RMSNorm stats and RoPE in fp32); observed bit-exact, tolerance = one bf16 ulp-ish."""
    ours, theirs = (copy.deepcopy(m).to(torch.bfloat16) for m in models)
    x, t, caps = make_inputs(*CASES["batch3_mixed_caption_lengths"])
    x, caps = [xi.bfloat16() for xi in x], [c.bfloat16() for c in caps]
    with torch.no_grad():
        got, want = ours(x, t, cap_feats=caps), reference(theirs, x, t, caps)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2)


def test_encode_context_reuse(models):
    ours, _ = models
    x, t, caps = make_inputs(*CASES["image_pad_tokens"])
    with torch.no_grad():
        context = ours.encode_context(caps)
        assert isinstance(context, CaptionContext) and context.lengths == [32, 64]
        assert context.tokens.shape == (96, TINY["dim"])
        direct = ours(x, t, cap_feats=caps)
        for _ in range(2):  # the same context serves several roll-out steps
            reused = ours(x, t, context=context)
            for a, b in zip(reused, direct):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError):
        ours(x, t)
    with pytest.raises(ValueError):
        ours(x, t, cap_feats=caps, context=context)


def loss_and_grads(model, x, t, caps):
    model.zero_grad(set_to_none=True)
    out = model(x, t, cap_feats=caps)
    weights = [torch.linspace(-1, 1, o.numel()).view(o.shape) for o in out]  # fixed non-uniform cotangent
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_outputs_and_grads(models, monkeypatch):
    ours, _ = models
    x, t, caps = make_inputs(*CASES["batch3_mixed_caption_lengths"])
    out_plain, grads_plain = loss_and_grads(ours, x, t, caps)
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "checkpoint", counting_checkpoint)
    ours.checkpointing = CheckpointPlan("full")
    try:
        out_ckpt, grads_ckpt = loss_and_grads(ours, x, t, caps)
    finally:
        ours.checkpointing = CheckpointPlan()
    cfg = ours.config
    assert calls == [False] * (cfg.n_layers + 2 * cfg.n_refiner_layers)  # every block, non-reentrant
    assert set(grads_plain) == set(grads_ckpt)
    for a, b in zip(out_plain, out_ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], **TOL, msg=name)


def test_parameter_gradients_match_diffusers(models):
    ours, theirs = models
    x, t, caps = make_inputs(*CASES["image_pad_tokens"])
    _, grads_ours = loss_and_grads(ours, x, t, caps)
    theirs.zero_grad(set_to_none=True)
    out = reference(theirs, x, t, caps)
    weights = [torch.linspace(-1, 1, o.numel()).view(o.shape) for o in out]
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(grads_ours[name], p.grad, rtol=1e-4, atol=1e-4, msg=name)
    theirs.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)


def official_keys():
    """The 521 checkpoint keys listed in shared/reference/models.md section 2.8."""
    block = [
        "attention.to_q.weight", "attention.to_k.weight", "attention.to_v.weight", "attention.to_out.0.weight",
        "attention.norm_q.weight", "attention.norm_k.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
        "attention_norm1.weight", "attention_norm2.weight", "ffn_norm1.weight", "ffn_norm2.weight",
    ]
    adaln = ["adaLN_modulation.0.weight", "adaLN_modulation.0.bias"]
    keys = {
        "all_x_embedder.2-1.weight", "all_x_embedder.2-1.bias",
        "all_final_layer.2-1.linear.weight", "all_final_layer.2-1.linear.bias",
        "all_final_layer.2-1.adaLN_modulation.1.weight", "all_final_layer.2-1.adaLN_modulation.1.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "cap_embedder.0.weight", "cap_embedder.1.weight", "cap_embedder.1.bias", "x_pad_token", "cap_pad_token",
    }
    for prefix, n, modulated in (("layers", 30, True), ("noise_refiner", 2, True), ("context_refiner", 2, False)):
        for i in range(n):
            keys.update(f"{prefix}.{i}.{k}" for k in block + (adaln if modulated else []))
    return keys


def test_full_config_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = ZImageTransformer(ZImageConfig())
        theirs = ZImageTransformer2DModel(axes_lens=[1536, 512, 512])
    sd = model.state_dict()
    assert len(sd) == 521
    assert set(sd) == official_keys()
    their_sd = theirs.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in their_sd.items()}
    shapes = {
        "layers.0.feed_forward.w1.weight": (10240, 3840),
        "layers.29.feed_forward.w2.weight": (3840, 10240),
        "layers.0.attention.to_k.weight": (3840, 3840),
        "layers.0.attention.norm_q.weight": (128,),
        "layers.0.adaLN_modulation.0.weight": (15360, 256),
        "all_x_embedder.2-1.weight": (3840, 64),
        "all_final_layer.2-1.linear.weight": (64, 3840),
        "all_final_layer.2-1.adaLN_modulation.1.weight": (3840, 256),
        "t_embedder.mlp.0.weight": (1024, 256),
        "t_embedder.mlp.2.weight": (256, 1024),
        "cap_embedder.0.weight": (2560,),
        "cap_embedder.1.weight": (3840, 2560),
        "x_pad_token": (1, 3840),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    assert sum(p.numel() for p in model.parameters()) == 6_154_908_736
    # Every projection is a plain nn.Linear reachable by its checkpoint name (LoRA wrappers swap them).
    assert isinstance(model.get_submodule("layers.3.attention.to_out.0"), torch.nn.Linear)
    assert isinstance(model.get_submodule("context_refiner.1.feed_forward.w3"), torch.nn.Linear)


def test_config_from_dict():
    cfg = ZImageConfig.from_dict({"_class_name": "ZImageTransformer2DModel", "dim": 64, "axes_dims": [8, 12, 12]})
    assert cfg.dim == 64 and cfg.axes_dims == (8, 12, 12) and cfg.n_layers == 30
    with pytest.raises(ValueError, match="bogus"):
        ZImageConfig.from_dict({"dim": 64, "bogus": 1})

"""models/layout_cache.py: the packed layouts and RoPE tables a forward derives from shapes are built once per
shapes, kept on the model, equal to fresh ones field for field, and give bitwise the outputs of an uncached model."""
import dataclasses

import pytest
import torch

from dopsd_fast.models import flux2_klein, z_image
from dopsd_fast.models.flux2_klein import Flux2KleinConfig, Flux2KleinTransformer
from dopsd_fast.models.layout_cache import LayoutCache
from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer
from dopsd_fast.testing import randomize_adapters, tiny_trainer

ZIMAGE = ZImageConfig(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                      axes_dims=(4, 6, 6), axes_lens=(256, 32, 32))
KLEIN = Flux2KleinConfig(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(4, 4, 4, 4))


def model_and_inputs(family: str, batch: int = 2):
    """A tiny model and a batch of unequal samples (Klein: the second sample with two reference images)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    sizes, lengths = [(6, 8), (4, 6)][:batch], [5, 40][:batch]
    if family == "z_image":
        model = ZImageTransformer(ZIMAGE)
        x = [torch.randn(4, 1, h, w, generator=g) for h, w in sizes]
        conds = [torch.randn(n, 16, generator=g) for n in lengths]
    else:
        model = Flux2KleinTransformer(KLEIN)
        x = [torch.randn(8, h, w, generator=g) for h, w in sizes]
        texts = [torch.randn(n, 12, generator=g) for n in lengths]
        refs = [[], [torch.randn(8, 3, 2, generator=g), torch.randn(8, 2, 3, generator=g)]][:batch]
        conds = [flux2_klein.ReferenceCondition(t, r) for t, r in zip(texts, refs)]
    return model, x, torch.rand(batch, generator=g), conds


def count_calls(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    fn = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def assert_same(a, b, where="layout"):
    """Field for field: tensors equal bitwise (dtype and device too), everything else equal."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), where
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("family", ["z_image", "flux2_klein"])
def test_second_forward_with_the_same_shapes_builds_nothing(family, monkeypatch):
    model, x, t, conds = model_and_inputs(family)
    module = z_image if family == "z_image" else flux2_klein
    rope, index = count_calls(monkeypatch, module, "rope_cos_sin"), count_calls(monkeypatch, module, "sample_index_of")
    with torch.no_grad():
        first = model(x, t, cap_feats=conds)
        built = (model.layouts.builds, rope[0], index[0])
        assert built[0] == 2 and built[1] > 0 and built[2] > 0    # one context and one forward layout
        context = model.encode_context(conds)
        for sigma in (0.9, 0.5):        # the roll-out's next steps: same shapes, another t
            again = model(x, torch.full_like(t, sigma), context=context)
        repeat = model(x, t, cap_feats=conds)
    assert (model.layouts.builds, rope[0], index[0]) == built, "a forward with cached shapes built a layout"
    assert all(torch.equal(a, b) for a, b in zip(first, repeat))
    assert len(again) == len(x)
    # another image size builds one forward layout (the context's is reused)
    with torch.no_grad():
        model([xi[..., :4, :4] for xi in x], t, context=context)
    assert model.layouts.builds == built[0] + 1


@pytest.mark.parametrize("family", ["z_image", "flux2_klein"])
def test_cached_layouts_equal_fresh_ones_and_outputs_are_bitwise_uncached(family):
    model, x, t, conds = model_and_inputs(family)
    with torch.no_grad():
        model(x, t, cap_feats=conds)            # fills the cache
        cached = model(x, t, cap_feats=conds)   # from it
        context = model.encode_context(conds)
        key = next(k for k in model.layouts._entries if k[0] in ("image", "target"))
        if family == "z_image":
            fresh = model._image_layout(key[1], [z_image.round_up(g[0] * g[1] * g[2]) for g in key[1]], context,
                                        x[0].device)
        else:
            fresh = model._target_layout(key[1], context, x[0].device)
        assert_same(model.layouts._entries[key], fresh)
        model.layouts = LayoutCache(maxsize=0)  # every forward builds afresh (the code before the cache)
        uncached = model(x, t, cap_feats=conds)
    assert model.layouts.builds == 2 and len(model.layouts) == 0
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hand_made_context_is_never_cached():
    model, x, t, conds = model_and_inputs("z_image")
    with torch.no_grad():
        context = dataclasses.replace(model.encode_context(conds), layout_key=None)
        builds = model.layouts.builds
        model(x, t, context=context)
        model(x, t, context=context)
    assert model.layouts.builds == builds + 2 and len(model.layouts) == 1     # the context's own entry only


def test_cache_is_lru_bounded():
    cache = LayoutCache(maxsize=2)
    for key in ("a", "b", "a", "c"):    # "b" is the least recently used when "c" arrives
        cache.get(key, lambda: object())
    assert cache.builds == 3 and list(cache._entries) == ["a", "c"]


def test_one_iteration_builds_each_layout_once_and_the_next_nothing(tmp_path):
    """K steps x 2 roles of forwards build one context and one forward layout per distinct context length (teacher
    and student, equal here: toy contexts pad to one multiple of 32), and a next iteration of the same shapes none."""
    tr = tiny_trainer(tmp_path, "train.batch_size=2")
    randomize_adapters(tr)
    tr.forward_backward_step(next(tr.stream))
    keys = list(tr.model.layouts._entries)
    assert tr.model.layouts.builds == len(keys) == 2 * sum(k[0] == "caption" for k in keys)
    tr.optimizer_step()
    tr.forward_backward_step(next(tr.stream))
    assert tr.model.layouts.builds == len(keys) and set(tr.model.layouts._entries) == set(keys)

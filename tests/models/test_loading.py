"""Loading diffusers-format transformer folders (single file and sharded) into our ZImageTransformer."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dopsd_fast.models.loading import WeightsError, load_zimage_transformer

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel  # noqa: E402

from test_z_image import TINY, randomize_  # noqa: E402  (same folder: the tiny config and its randomiser)


@pytest.fixture(scope="module")
def theirs():
    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})
    randomize_(model)
    return model.eval()


@pytest.fixture
def saved(theirs, tmp_path, request):
    shard = getattr(request, "param", "10GB")
    theirs.save_pretrained(tmp_path, max_shard_size=shard, safe_serialization=True)
    return tmp_path


@pytest.mark.parametrize("saved", ["10GB", "200KB"], indirect=True, ids=["single", "sharded"])
def test_loaded_model_matches_diffusers(theirs, saved, request):
    sharded = request.node.callspec.params["saved"] == "200KB"
    assert (saved / "diffusion_pytorch_model.safetensors.index.json").exists() == sharded
    assert len(list(saved.glob("*.safetensors"))) > 1 if sharded else 1
    ours = load_zimage_transformer(saved)
    g = torch.Generator().manual_seed(3)
    x, caps = [torch.randn(16, 1, 8, 8, generator=g)], [torch.randn(9, TINY["cap_feat_dim"], generator=g)]
    t = torch.tensor([0.4])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, cap_feats=caps)[0], theirs(x, t, caps, return_dict=False)[0][0],
                                   rtol=1e-5, atol=1e-5)


def test_dtype_on_load(saved):
    model = load_zimage_transformer(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _rewrite_single(folder, edit):
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.pop("x_pad_token"), "1 missing (e.g. x_pad_token)"),
    (lambda t: t.__setitem__("layers.0.attention.qkv.weight", torch.zeros(2)), "1 unexpected (e.g. layers.0.attention.qkv.weight)"),
    (lambda t: t.__setitem__("cap_pad_token", torch.zeros(1, 8)), "1 mis-shaped (e.g. cap_pad_token: file (1, 8) vs model (1, 64))"),
])
def test_wrong_keys_or_shapes_are_named(saved, edit, fragment):
    _rewrite_single(saved, edit)
    with pytest.raises(WeightsError) as e:
        load_zimage_transformer(saved)
    assert fragment in str(e.value) and str(saved) in str(e.value)


@pytest.mark.parametrize("saved", ["200KB"], indirect=True)
def test_missing_shard_is_named(saved):
    index = json.loads((saved / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (saved / shard).unlink()
    with pytest.raises(WeightsError, match=f"not there: .*{shard}"):
        load_zimage_transformer(saved)


def test_corrupt_file_and_missing_config(saved, tmp_path):
    (saved / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_zimage_transformer(saved)
    (saved / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json: missing"):
        load_zimage_transformer(saved)
    with pytest.raises(WeightsError, match="not a directory"):
        load_zimage_transformer(tmp_path / "nope")


@pytest.mark.parametrize("saved", ["10GB", "200KB"], indirect=True, ids=["single", "sharded"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_is_refused_naming_file_and_tensor(saved, bad):
    index, key = saved / "diffusion_pytorch_model.safetensors.index.json", "layers.0.feed_forward.w2.weight"
    path = saved / (json.loads(index.read_text())["weight_map"][key] if index.exists() else
                    "diffusion_pytorch_model.safetensors")
    tensors = load_file(str(path))
    tensors[key].view(-1)[5] = bad
    save_file(tensors, str(path))
    with pytest.raises(WeightsError, match=f"{path}: tensor '{key}' holds NaN or Inf"):
        load_zimage_transformer(saved)


@pytest.mark.parametrize("edit, fragment", [
    (lambda raw: "{not json", "config.json: not valid JSON"),
    (lambda raw: b"\xff\xfe{}", "config.json: not valid JSON"),
    (lambda raw: "[1, 2]", "config.json: expected a JSON object of config keys, got a list"),
    (lambda raw: json.dumps({**raw, "dim": "big"}), 'config.json: dim is "big", expected int'),
    (lambda raw: json.dumps({**raw, "axes_dims": [8, "12", 12]}), 'config.json: axes_dims is [8, "12", 12], expected tuple'),
    (lambda raw: json.dumps({**raw, "qk_norm": 1}), "config.json: qk_norm is 1, expected bool"),
    (lambda raw: json.dumps({**raw, "n_heads": 0}), "config.json: describes no buildable ZImageTransformer"),
], ids=["not-json", "not-utf8", "a-list", "string-dim", "string-in-list", "int-for-bool", "zero-heads"])
def test_bad_config_json_is_named_not_a_traceback(saved, edit, fragment):
    path = saved / "config.json"
    text = edit(json.loads(path.read_text()))
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(WeightsError) as e:
        load_zimage_transformer(saved)
    assert f"{saved}/{fragment}" in str(e.value)


@pytest.mark.parametrize("dtype, code", [(torch.int32, "I32"), (torch.uint8, "U8"), (torch.bool, "BOOL")])
def test_integer_weights_are_refused_naming_the_tensor_and_dtype(saved, dtype, code):
    _rewrite_single(saved, lambda t: t.__setitem__("layers.0.feed_forward.w1.weight",
                                                   t["layers.0.feed_forward.w1.weight"].to(dtype)))
    with pytest.raises(WeightsError, match=f"diffusion_pytorch_model.safetensors: tensor "
                                           f"'layers.0.feed_forward.w1.weight' is stored as {code}"):
        load_zimage_transformer(saved)


def test_component_config_that_is_not_an_object_or_has_wrong_types(tmp_path):
    from dopsd_fast.models.loading import load_qwen3_text_encoder, read_component_config

    (tmp_path / "config.json").write_text('"a string"')
    with pytest.raises(WeightsError, match="config.json: expected a JSON object of config keys, got a str"):
        read_component_config(tmp_path, "vae/")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": "wide", "num_hidden_layers": 1}))
    with pytest.raises(WeightsError, match="config.json: not a Qwen3 text-encoder config .*hidden_size"):
        load_qwen3_text_encoder(tmp_path)

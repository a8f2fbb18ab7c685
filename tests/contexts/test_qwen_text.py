"""Student context: Qwen3 features equal transformers' hidden_states at the spec's layers, on real token ids."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dopsd_fast.contexts.qwen_text import KLEIN_TEXT, QwenTextEncoder, TextFeatureSpec, Z_IMAGE_TEXT
from dopsd_fast.models.loading import WeightsError

PROMPTS = ["a red cat sitting on a green mat, studio light", "x", "一只猫"]


@pytest.fixture(scope="module")
def reference(tiny_root):
    from transformers import Qwen3Model
    return Qwen3Model.from_pretrained(tiny_root / "text_encoder").eval()


@pytest.fixture(scope="module")
def zimage(tiny_root):
    return QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer")


def _hidden_states(model, enc, prompts):
    ids, mask = enc.token_ids(prompts)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states, ids, mask


def test_zimage_features_are_hidden_states_minus_2_real_tokens(zimage, reference):
    enc = zimage
    assert len(enc.model.layers) == 2            # 3-layer encoder cut after the layer hidden_states[-2] needs
    feats = enc(PROMPTS)
    hs, ids, mask = _hidden_states(reference, enc, PROMPTS)
    text = enc.tokenizer.decode(ids[1][mask[1].bool()])
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    for f, h, m in zip(feats, hs[-2], mask):
        assert f.shape == (int(m.sum()), 64)
        torch.testing.assert_close(f, h[m.bool()], rtol=1e-5, atol=1e-5)
    assert len({f.shape[0] for f in feats}) == 3          # variable length, no pads


def test_truncation_at_max_tokens(tiny_root):
    enc = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer",
                                          TextFeatureSpec(max_tokens=12))
    assert enc(["word " * 50])[0].shape == (12, 64)


def test_klein_style_layers_concat_and_pads_kept(tiny_root, reference):
    spec = TextFeatureSpec(layers=(1, 2), max_tokens=40, keep_padding=True, enable_thinking=False)
    enc = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", spec)
    feats = torch.stack(enc(PROMPTS[:2]))
    hs, ids, _ = _hidden_states(reference, enc, PROMPTS[:2])
    assert "<think>\n\n</think>\n\n" in enc.tokenizer.decode(ids[0])
    assert feats.shape == (2, 40, 128)
    torch.testing.assert_close(feats, torch.cat([hs[1], hs[2]], -1), rtol=1e-5, atol=1e-5)
    assert KLEIN_TEXT.layers_to_run(36) == 27 and Z_IMAGE_TEXT.layers_to_run(36) == 35


def test_last_layer_runs_the_final_norm(tiny_root, reference):
    enc = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", TextFeatureSpec(layers=(-1,)))
    hs, _, mask = _hidden_states(reference, enc, PROMPTS[:1])
    torch.testing.assert_close(enc(PROMPTS[:1])[0], hs[-1][0][mask[0].bool()], rtol=1e-5, atol=1e-5)


def test_bf16_on_load(tiny_root):
    enc = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", dtype=torch.bfloat16)
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    assert enc(PROMPTS[:1])[0].dtype == torch.bfloat16


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.pop("norm.weight"), "1 missing (e.g. norm.weight)"),
    (lambda t: t.__setitem__("layers.9.mlp.up_proj.weight", torch.ones(2)), "1 unexpected (e.g. layers.9.mlp.up_proj.weight)"),
    (lambda t: t.__setitem__("layers.2.input_layernorm.weight", torch.ones(3)),
     "1 mis-shaped (e.g. layers.2.input_layernorm.weight: file (3,) vs model (64,))"),
])
def test_bad_text_encoder_weights_name_the_keys(tiny_root, tmp_path, edit, fragment):
    """Layers past the cut are checked too, although they are never read."""
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_root / "text_encoder" / "config.json").read_text())
    tensors = load_file(str(tiny_root / "text_encoder" / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="text_encoder") as err:
        QwenTextEncoder.from_pretrained(folder, tiny_root / "tokenizer")
    assert fragment in str(err.value)


def test_causal_lm_keys_load(tiny_root, tmp_path, zimage):
    """Hub text_encoder folders saved from Qwen3ForCausalLM carry a `model.` prefix (and maybe lm_head)."""
    tensors = {f"model.{k}": v for k, v in load_file(str(tiny_root / "text_encoder" / "model.safetensors")).items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    folder = tmp_path / "te"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = json.loads((tiny_root / "text_encoder" / "config.json").read_text()) | {"architectures": ["Qwen3ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    a = QwenTextEncoder.from_pretrained(folder, tiny_root / "tokenizer")(PROMPTS[:1])[0]
    b = zimage(PROMPTS[:1])[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)

"""LoRA export loads into diffusers' ZImagePipeline; the ComfyUI file is the same update on fused qkv; full weights
in the diffusers layout (single and sharded) load back into diffusers and into our model."""
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from dopsd_fast.contexts.qwen_tokenizer import CHAT_TEMPLATE  # noqa: E402
from dopsd_fast.contexts.tiny import TINY_TRANSFORMER, tiny_qwen3_config, tiny_vae  # noqa: E402
from dopsd_fast.models.export import (LORA_FILE, lora_modules, save_comfyui_lora, save_diffusers_lora,  # noqa: E402
                                      save_full_weights)
from dopsd_fast.models.loading import load_zimage_transformer  # noqa: E402
from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer  # noqa: E402
from dopsd_fast.nn.lora_linear import inject_lora, set_active_adapter  # noqa: E402

TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
           "feed_forward.w2", "feed_forward.w3"]
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def trained():
    """Our tiny transformer with random base weights and a random (non-zero) student LoRA, as after training."""
    torch.manual_seed(0)
    model = ZImageTransformer(ZImageConfig.from_dict(TINY_TRANSFORMER))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    inject_lora(model, TARGETS, ["student"], RANK, ALPHA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 8, 6, generator=g)], torch.tensor([0.3]), [torch.randn(7, 64, generator=g)]


def _ours(model, adapter):
    x, t, caps = _inputs()
    set_active_adapter(model, adapter)
    with torch.no_grad():
        return model(x, t, cap_feats=caps)[0]


def _theirs(transformer):
    x, t, caps = _inputs()
    with torch.no_grad():
        return transformer(x, t, caps, return_dict=False)[0][0]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["a cat on a mat", "user assistant"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def test_diffusers_lora_loads_into_zimage_pipeline(trained, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
    from transformers import Qwen3Model

    save_full_weights(trained, tmp_path / "base", adapter=None)          # the untouched base, diffusers layout
    path = save_diffusers_lora(trained, tmp_path / "lora")
    assert path.name == LORA_FILE
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == RANK and meta["transformer.lora_alpha"] == ALPHA

    transformer = ZImageTransformer2DModel.from_pretrained(tmp_path / "base").eval()
    torch.testing.assert_close(_theirs(transformer), _ours(trained, None), rtol=1e-5, atol=1e-5)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(),
                          text_encoder=Qwen3Model(tiny_qwen3_config(num_layers=2)).eval(),
                          tokenizer=_tiny_tokenizer(), transformer=transformer)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with_lora = _theirs(pipe.transformer)
    torch.testing.assert_close(with_lora, _ours(trained, "student"), rtol=1e-4, atol=1e-4)
    assert (with_lora - _ours(trained, None)).abs().max() > 1e-2          # the LoRA really changes the output
    image = pipe("a cat on a mat", height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
                 max_sequence_length=32, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_comfyui_lora_is_the_same_update_on_fused_qkv(trained, tmp_path):
    sd = load_file(str(save_comfyui_lora(trained, tmp_path / "comfy.safetensors")))
    assert all(k.startswith("diffusion_model.") for k in sd)
    assert "diffusion_model.layers.0.attention.qkv.lora_down.weight" in sd
    assert "diffusion_model.context_refiner.0.attention.out.lora_up.weight" in sd
    assert not any(".to_q." in k or ".to_out." in k for k in sd)

    def delta(prefix):
        down, up = sd[f"{prefix}.lora_down.weight"], sd[f"{prefix}.lora_up.weight"]
        return sd[f"{prefix}.alpha"].item() / down.shape[0] * up @ down

    for name, m in lora_modules(trained).items():
        ours = m.scale * m.lora_B["student"] @ m.lora_A["student"]
        block, _, leaf = name.rpartition(".attention.")
        if leaf in ("to_q", "to_k", "to_v"):
            fused = delta(f"diffusion_model.{block}.attention.qkv")
            theirs = fused.chunk(3)["qkv".index(leaf[-1])]
        else:
            theirs = delta("diffusion_model." + name.replace("attention.to_out.0", "attention.out"))
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shard_bytes", [10**10, 200_000], ids=["single", "sharded"])
def test_full_weights_merge_the_lora(trained, tmp_path, shard_bytes):
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel

    out = save_full_weights(trained, tmp_path / "transformer", max_shard_bytes=shard_bytes)
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file() == (shard_bytes < 10**10)
    expected = _ours(trained, "student")
    torch.testing.assert_close(_ours(load_zimage_transformer(out), None), expected, rtol=1e-4, atol=1e-4)
    theirs = ZImageTransformer2DModel.from_pretrained(out).eval()
    torch.testing.assert_close(_theirs(theirs), expected, rtol=1e-4, atol=1e-4)
    bf16 = save_full_weights(trained, tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(bf16 / "diffusion_pytorch_model.safetensors")).values()} == {torch.bfloat16}
    assert math.isfinite(float(expected.abs().sum()))


def test_dopsd_export_cli(tmp_path, capsys):
    """A tiny-cpu run exported in the three formats; the diffusers file holds the trained student's adapters."""
    from dopsd_fast.cli import main

    run = tmp_path / "run"
    assert main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(run))}",
                 "--set", "train.steps=1", "--set", "train.resume=null"]) == 0
    for fmt in ("diffusers", "comfyui", "full"):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    student = load_file(str(run / "checkpoints" / "step-000001" / "student.safetensors"))
    lora = load_file(str(tmp_path / "diffusers" / LORA_FILE))
    key = "layers.0.attention.to_q.lora_B"
    torch.testing.assert_close(lora[f"transformer.{key}.weight"], student[f"{key}.student"])
    assert (tmp_path / "comfyui" / "lora_comfyui.safetensors").is_file()
    assert (tmp_path / "full" / "config.json").is_file()
    capsys.readouterr()
    assert main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(tmp_path / 'f'))}",
                 "--set", "train.steps=1", "--set", "train.resume=null", "--set", "adapter.mode=full"]) == 0
    assert main(["export", str(tmp_path / "f"), "--format", "comfyui", "--out", str(tmp_path / "x")]) == 2
    assert "use --format full" in capsys.readouterr().err

"""FLUX.2 [klein] end to end on tiny random components in the diffusers layout: Qwen3 features of layers 9/18/27
(pads kept), the FLUX.2 VAE codec (patchify + BatchNorm statistics), the reference or the Qwen3-VL teacher, a folder
of PNGs."""
import json

import pytest
import torch
from PIL import Image

from dopsd_fast.cli import main
from dopsd_fast.data.flux2_vae_latents import Flux2VaeLatents
from dopsd_fast.data.latents import unpatchify
from dopsd_fast.models.loading_flux2 import load_flux2_vae


def tiny_flux2_vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                             latent_channels=4, norm_num_groups=8, sample_size=32, patch_size=(2, 2))
    with torch.no_grad():       # statistics away from (0, 1), so the normalisation is really tested
        vae.bn.running_mean.copy_(torch.linspace(-1, 1, 16))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2, 16))
    return vae.eval()


@pytest.fixture(scope="module")
def klein_root(tmp_path_factory):
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
    from transformers import Qwen3Model

    from dopsd_fast.contexts.tiny import tiny_qwen3_config

    root = tmp_path_factory.mktemp("tiny-klein")
    torch.manual_seed(0)
    Qwen3Model(tiny_qwen3_config(num_layers=27)).save_pretrained(root / "text_encoder")   # layers 9, 18, 27 exist
    tiny_flux2_vae().save_pretrained(root / "vae")
    Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=3 * 64, axes_dims_rope=(4, 4, 4, 4),
                            guidance_embeds=False).save_pretrained(root / "transformer")
    return root


def test_flux2_vae_codec_matches_the_pipeline(klein_root):
    from diffusers import Flux2KleinPipeline

    vae = load_flux2_vae(klein_root / "vae")
    codec = Flux2VaeLatents(vae)
    image = torch.rand(3, 32, 48) * 2 - 1
    z = codec.encode(image)
    pipe = Flux2KleinPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
    assert z.shape == codec.latent_shape(32, 48) == (16, 8, 12)
    torch.testing.assert_close(z, pipe._encode_vae_image(image[None], None)[0], rtol=1e-6, atol=1e-6)
    raw = unpatchify(z * codec.std + codec.mean, 2)
    torch.testing.assert_close(codec.decode(z), vae.decode(raw[None]).sample[0].clamp(-1, 1), rtol=1e-6, atol=1e-6)


def _train_klein(klein_root, tiny_root, tmp_path, capsys, cache_first=None, **extra) -> set[str]:
    """A 2-step D-OPSD run on a folder of 3 PNGs; returns the cache kinds it wrote. ``cache_first``: `dopsd cache`
    first, call it, then train with data.encode_missing=false."""
    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo of thing {i}")
    sets = {"model.pretrained": klein_root / "transformer", "model.tokenizer": tiny_root / "tokenizer",
            "model.arch": "{}", "data.kind": "folder", "data.path": data, "data.image_size": 32, "data.buckets": 1,
            "data.cache_dir": tmp_path / "cache", "data.encode_missing": "true",      # no `dopsd cache` first
            "context.kind": "qwen3", "context.max_text_tokens": 48,
            "adapter.rank": 4, "adapter.alpha": 8, "train.steps": 2, "train.output_dir": tmp_path / "run",
            "train.resume": "null", "model.dtype": "fp32", "model.checkpointing": "none", **extra}
    if cache_first:
        sets["data.encode_missing"] = "false"
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v if isinstance(v, (int, str)) else json.dumps(str(v))}")]
    if cache_first:
        assert main(["cache", "flux2-klein-4b-lora", "--no-progress", *args]) == 0
        cache_first()
    rc = main(["train", "flux2-klein-4b-lora", "--no-progress", *args])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) and r["model_tflop"] > 0 for r in rows)
    assert (tmp_path / "run" / "samples.png").is_file()
    return {p.parent.parent.parent.name for p in (tmp_path / "cache").rglob("*.safetensors")}


def test_klein_trains_on_a_folder_with_qwen3_and_the_reference_teacher(klein_root, tiny_root, tmp_path, capsys):
    cached = _train_klein(klein_root, tiny_root, tmp_path, capsys)
    assert cached == {"student_text", "vae_latents"}      # the teacher's text is the student cache's entry


def test_klein_reference_teacher_on_a_warm_cache_loads_no_encoder(klein_root, tiny_root, tmp_path, capsys,
                                                                  monkeypatch):
    """After `dopsd cache` the reference teacher's text and latents come from the cache: training loads no text
    encoder, and the one VAE it loads is the samples grid's decoder, on the CPU."""
    from dopsd_fast.contexts.qwen_text import QwenTextEncoder
    from dopsd_fast.models import loading_flux2

    loads = []
    text, vae = QwenTextEncoder.from_pretrained.__func__, loading_flux2.load_flux2_vae
    monkeypatch.setattr(QwenTextEncoder, "from_pretrained",
                        classmethod(lambda *a, **k: loads.append("text") or text(*a, **k)))
    monkeypatch.setattr(loading_flux2, "load_flux2_vae",
                        lambda folder, dtype, device: loads.append(f"vae:{device}") or vae(folder, dtype, device))
    cached = _train_klein(klein_root, tiny_root, tmp_path, capsys, cache_first=loads.clear)
    assert cached == {"student_text", "vae_latents"}
    assert loads == ["vae:cpu"]


def test_klein_trains_on_a_folder_with_the_qwen3_vl_teacher(klein_root, tiny_root, tmp_path, capsys):
    from dopsd_fast.contexts.tiny import save_tiny_qwen3vl

    vl_dir = save_tiny_qwen3vl(tmp_path / "qwen3-vl", tiny_root / "tokenizer", num_layers=27)   # layers 9, 18, 27
    cached = _train_klein(klein_root, tiny_root, tmp_path, capsys, **{
        "context.teacher": "vlm", "context.teacher_model": vl_dir,
        "context.teacher_min_pixels": 32 * 32, "context.teacher_max_pixels": 64 * 64})
    assert cached == {"student_text", "teacher_mm"}      # D-OPSD never encodes the target: the teacher sees pixels

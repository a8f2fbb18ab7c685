"""The VAE loads from a diffusers vae/ folder (key checks, dtype) and the codec applies Z-Image's scale and shift."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("diffusers")

from dopsd_fast.contexts.tiny import tiny_vae  # noqa: E402
from dopsd_fast.data.vae_latents import VaeLatents  # noqa: E402
from dopsd_fast.models.loading import WeightsError, load_vae  # noqa: E402


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(folder)
    return folder


def test_codec_matches_diffusers_with_scale_and_shift(vae_dir):
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(vae_dir).eval()
    codec = VaeLatents(load_vae(vae_dir))
    img = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = codec.encode(img)
    assert z.shape == codec.latent_shape(32, 48) == (16, 1, 16, 24)
    with torch.no_grad():
        expected = (ref.encode(img[None]).latent_dist.mode() - 0.1159) * 0.3611
        torch.testing.assert_close(z, expected[0].unsqueeze(1), rtol=1e-5, atol=1e-5)
        back = ref.decode(expected / 0.3611 + 0.1159).sample[0].clamp(-1, 1)
    torch.testing.assert_close(codec.decode(z), back, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        codec.latent_shape(31, 32)


def test_bf16_on_load(vae_dir):
    vae = load_vae(vae_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert VaeLatents(vae).encode(torch.zeros(3, 16, 16).uniform_(-1, 1)).dtype == torch.float32


def test_bad_vae_folder_names_the_keys(vae_dir, tmp_path):
    tensors = load_file(str(vae_dir / "diffusion_pytorch_model.safetensors"))
    tensors.pop("encoder.conv_in.bias")
    tensors["decoder.conv_out.weight"] = torch.zeros(3, 16, 1, 1)
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(WeightsError, match=r"1 missing \(e.g. encoder.conv_in.bias\).*1 mis-shaped \(e.g. decoder.conv_out.weight"):
        load_vae(tmp_path)
    with pytest.raises(WeightsError, match="config.json: missing"):
        load_vae(tmp_path / "absent")

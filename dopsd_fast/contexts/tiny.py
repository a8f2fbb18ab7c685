"""Tiny random Qwen3 / Qwen3-VL / VAE / Z-Image components in the official folder layouts (tests, smoke runs).

``save_tiny_zimage(root)`` writes ``transformer/ text_encoder/ tokenizer/ vae/`` like the Z-Image-Turbo download
and a ``qwen3-vl/`` transformers folder for the teacher; everything loads with no network. The tokenizer is the
real Qwen vocabulary (``qwen_tokenizer.py``), so the encoders see real token ids.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 151_936              # Qwen3's embedding rows (the BPE has 151,643 ranks + specials below it)
HIDDEN = 64                  # = the tiny transformer's cap_feat_dim
IMAGE_TOKEN_ID = 151_655     # <|image_pad|>
VISION_START_ID = 151_652    # <|vision_start|>
VISION_END_ID = 151_653      # <|vision_end|>


def tiny_qwen3_config(num_layers: int = 3, rope_theta: float = 10000.0):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, tie_word_embeddings=True)


def tiny_qwen3vl_config(num_layers: int = 3, rope_theta: float = 10000.0):
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                         video_token_id=151_656, vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159)


TINY_TRANSFORMER = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
                        n_heads=2, n_kv_heads=2, cap_feat_dim=HIDDEN, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64],
                        rope_theta=256.0, t_scale=1000.0)


def save_tiny_zimage(root: str | Path, seed: int = 0, rope_theta_vl: float = 10000.0) -> Path:
    """Random tiny components under ``root`` (diffusers layout + ``qwen3-vl/``); returns ``root``."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
    from transformers import Qwen3Model

    from .qwen_tokenizer import offline_qwen_tokenizer

    root = Path(root)
    torch.manual_seed(seed)
    ZImageTransformer2DModel(**TINY_TRANSFORMER).save_pretrained(root / "transformer")
    Qwen3Model(tiny_qwen3_config()).save_pretrained(root / "text_encoder")
    tiny_vae().save_pretrained(root / "vae")
    offline_qwen_tokenizer(root / "tokenizer")
    save_tiny_qwen3vl(root / "qwen3-vl", root / "tokenizer", rope_theta=rope_theta_vl)
    return root


def save_tiny_qwen3vl(folder: str | Path, tokenizer_dir: str | Path, num_layers: int = 3,
                      rope_theta: float = 10000.0) -> Path:
    """A random tiny Qwen3-VL transformers folder (the teacher), with the tokenizer of ``tokenizer_dir``."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    folder = Path(folder)
    Qwen3VLForConditionalGeneration(tiny_qwen3vl_config(num_layers, rope_theta)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True).save_pretrained(str(folder))
    return folder

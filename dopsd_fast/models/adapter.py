"""Model families behind one interface, so the trainer and the method never branch on the model.

A family bundles what differs between Z-Image and FLUX.2 [klein]: how the transformer is built and loaded,
the flow convention (time input, output sign), the roll-out and sampler schedules (klein's depend on the
image's token count), the latent shape of an image, the text-feature width, the FLOP count and the export
layouts (diffusers class, ComfyUI names). Both models take
``model(x: list[latent], t, context=model.encode_context(conds))``, which is how the roles call them.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..data.latents import PatchedPixelLatents, PixelLatents
from ..method.schedule import FLUX2, Z_IMAGE, FlowConvention, empirical_mu_sigmas, rollout_sigmas, shifted_sigmas
from ..metrics import flops
from ..train.config import IMAGE_KINDS
from .flux2_klein import KLEIN_4B, KLEIN_9B, Flux2KleinConfig, Flux2KleinTransformer, ReferenceCondition
from .z_image import ZImageConfig, ZImageTransformer

LATENT_FACTOR = 16  # FLUX.2 VAE /8, then 2x2 patchify to 128 channels
# diffusers name -> ComfyUI's Z-Image name (the rest is equal); q, k, v fuse into attention.qkv
ZIMAGE_COMFY_RENAMES = {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1": "final_layer",
                        "attention.to_out.0": "attention.out"}
ZIMAGE_QKV = ("attention.to_q.weight", "attention.to_k.weight", "attention.to_v.weight")


class ModelFamily:
    name: str
    flow: FlowConvention
    config_cls: type
    model_cls: type[nn.Module]
    inference_steps: int        # the distilled model's few-step sampler (validation grids: validation.steps=null)
    diffusers_class: str        # "_class_name" of an exported transformer/config.json

    def comfy_weight(self, name: str):
        """One of our (= diffusers) weight names -> (ComfyUI name, part, parts, rows): that weight, its rows mapped
        by ``rows``, is row block ``part`` of ``parts`` equal blocks of ComfyUI's tensor (fused qkv), without the
        ``diffusion_model.`` prefix."""
        raise NotImplementedError

    def build(self, arch, device: str | torch.device = "cpu") -> nn.Module:
        with torch.device(device):
            return self.model_cls(arch)

    def load(self, path: str | Path, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def text_dim(self, arch) -> int:
        raise NotImplementedError

    def codec(self, cfg, arch):
        """Image <-> latent for the configured data (the pixel-space synthetic set: no VAE)."""
        raise NotImplementedError

    def vae_codec(self, folder: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu"):
        """Image <-> latent through the model's VAE (a diffusers ``vae/`` folder)."""
        raise NotImplementedError

    def vae_latent_shape(self, vae_config: dict, height: int, width: int) -> tuple[int, ...]:
        """``vae_codec(...).latent_shape(height, width)`` from the VAE's config.json alone (cached latents)."""
        raise NotImplementedError

    def latent_shape(self, cfg, arch) -> tuple[int, ...]:
        """Latent shape of a data.image_size square image (planning; batches carry their own sizes)."""
        raise NotImplementedError

    def image_tokens(self, arch, latent_shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    def training_sigmas(self, method, sample, latent_shape: tuple[int, ...]) -> list[float]:
        """Roll-out sigma_0 .. sigma_K (= 0): method.sigmas, or with method.schedule=model the family's sampler
        schedule at method.steps for this latent size."""
        if method.schedule == "fixed":
            return rollout_sigmas(method.sigmas)
        return self.sampling_sigmas(method.steps, sample.shift, latent_shape)

    def sampling_sigmas(self, steps: int, shift: float, latent_shape: tuple[int, ...]) -> list[float]:
        raise NotImplementedError

    def flops_layout(self, arch, latent_shape: tuple[int, ...], cond) -> flops.Forward:
        """One sample's forward as metrics.flops counts it: linears, token counts, attention, context path."""
        raise NotImplementedError

    def forward_flops(self, arch, latent_shape: tuple[int, ...], cond) -> flops.Flops:
        return self.flops_layout(arch, latent_shape, cond).flops

    def iteration_flops(self, arch, latent_shape, c_s, c_t, steps: int, adapters: flops.Adapters | None) -> float:
        """Model FLOPs of one sample's D-OPSD iteration (metrics.flops.dopsd_iteration's accounting); ``adapters``:
        (rank, adapted linears' names) of LoRA roles, None for full fine-tuning."""
        teacher, student = (self.flops_layout(arch, latent_shape, c) for c in (c_t, c_s))
        return flops.dopsd_iteration(teacher, student, steps, adapters).total

    def iteration_flops_verl_omni(self, arch, latent_shape, c_s, c_t, steps: int) -> float:
        """The same iteration under VeRL-Omni's MFU convention (metrics.flops.verl_omni_iteration)."""
        teacher, student = (self.flops_layout(arch, latent_shape, c) for c in (c_t, c_s))
        return flops.verl_omni_iteration(teacher, student, steps).total


class ZImageFamily(ModelFamily):
    name, flow, config_cls, model_cls = "z_image", Z_IMAGE, ZImageConfig, ZImageTransformer
    inference_steps = 8         # Z-Image-Turbo: 8 DiT forwards (DEFAULT_INFERENCE_STEPS, models.md)
    diffusers_class = "ZImageTransformer2DModel"

    def load(self, path, dtype):
        from .loading import load_zimage_transformer
        return load_zimage_transformer(path, dtype)

    def comfy_weight(self, name):
        for part, leaf in enumerate(ZIMAGE_QKV):
            if name.endswith(leaf):
                return name.removesuffix(leaf) + "attention.qkv.weight", part, 3, lambda w: w
        for ours, theirs in ZIMAGE_COMFY_RENAMES.items():
            name = name.replace(ours, theirs)
        return name, 0, 1, lambda w: w

    def text_dim(self, arch: ZImageConfig) -> int:
        return arch.cap_feat_dim

    def codec(self, cfg, arch):
        return PixelLatents()

    def vae_codec(self, folder, dtype, device="cpu"):
        from ..data.vae_latents import VaeLatents
        from .loading import load_vae
        return VaeLatents(load_vae(folder, dtype, device))

    def vae_latent_shape(self, vae_config, height, width):
        from ..data.vae_latents import VaeLatents
        return VaeLatents.config_latent_shape(vae_config, height, width)

    def latent_shape(self, cfg, arch: ZImageConfig):
        s = cfg.data.image_size
        return (arch.in_channels, 1, s // 8, s // 8) if cfg.data.kind in IMAGE_KINDS else PixelLatents().latent_shape(s, s)

    def image_tokens(self, arch: ZImageConfig, latent_shape):
        p = arch.all_patch_size[0]
        return latent_shape[-1] // p * (latent_shape[-2] // p)

    def sampling_sigmas(self, steps, shift, latent_shape):
        return shifted_sigmas(steps, shift)

    def flops_layout(self, arch, latent_shape, cond):
        return flops.zimage_layout(arch, self.image_tokens(arch, latent_shape), len(cond))


class Flux2KleinFamily(ModelFamily):
    """FLUX.2 [klein]: t = sigma, output eps - x0, empirical-mu schedules, reference tokens for the teacher."""

    name, flow, config_cls, model_cls = "flux2_klein", FLUX2, Flux2KleinConfig, Flux2KleinTransformer
    inference_steps = 4         # FLUX.2 [klein]: num_steps 4, no CFG (models.md)
    diffusers_class = "Flux2Transformer2DModel"

    def load(self, path, dtype):
        from .loading_flux2 import load_flux2_klein_transformer
        return load_flux2_klein_transformer(path, dtype)

    def comfy_weight(self, name):
        # ComfyUI's FLUX.2 model keeps BFL's names: the loader's rename table, backwards
        from .loading_flux2 import diffusers_to_bfl
        return diffusers_to_bfl(name)

    def text_dim(self, arch: Flux2KleinConfig) -> int:
        return arch.joint_attention_dim

    @staticmethod
    def pixel_patch(arch: Flux2KleinConfig) -> int:
        """Synthetic pixel data: in_channels = 3 p^2 (p x p pixel patches per token)."""
        p = math.isqrt(arch.in_channels // 3)
        if 3 * p * p != arch.in_channels:
            raise ValueError(f"in_channels={arch.in_channels}: pixel-space data needs 3 * p^2 channels (12, 48, ...)")
        return p

    def codec(self, cfg, arch):
        # image folders go through the FLUX.2 VAE (vae_codec, built with the caches)
        return None if cfg.data.kind in IMAGE_KINDS else PatchedPixelLatents(self.pixel_patch(arch))

    def vae_codec(self, folder, dtype, device="cpu"):
        from ..data.flux2_vae_latents import Flux2VaeLatents
        from .loading_flux2 import load_flux2_vae
        return Flux2VaeLatents(load_flux2_vae(folder, dtype, device))

    def vae_latent_shape(self, vae_config, height, width):
        from ..data.flux2_vae_latents import Flux2VaeLatents
        return Flux2VaeLatents.config_latent_shape(vae_config, height, width)

    def latent_shape(self, cfg, arch: Flux2KleinConfig):
        s = cfg.data.image_size
        if cfg.data.kind in IMAGE_KINDS:
            return (arch.in_channels, s // LATENT_FACTOR, s // LATENT_FACTOR)
        return PatchedPixelLatents(self.pixel_patch(arch)).latent_shape(s, s)

    def image_tokens(self, arch, latent_shape):
        return latent_shape[-1] * latent_shape[-2]

    def resolve_arch(self, cfg, need_weights: bool = True) -> Flux2KleinConfig:
        """The architecture from model.pretrained (folder config.json or BFL shapes) or model.arch; ValueError
        names the config key. A dry run before the download assumes the official 4B (9B if the path says so)."""
        from .loading import WeightsError
        from .loading_flux2 import read_pretrained_config

        m = cfg.model
        if m.pretrained is not None:
            if m.arch:
                raise ValueError("model.arch: must be empty when model.pretrained is set (the weights define it)")
            path = Path(m.pretrained)
            if not need_weights and not path.exists():
                return KLEIN_9B if "9b" in str(path).lower() else KLEIN_4B
            try:
                a = read_pretrained_config(path)
            except WeightsError as err:
                raise ValueError(f"model.pretrained: {err}") from None
        else:
            arch = dict(m.arch)
            if cfg.data.kind == "synthetic":
                arch.setdefault("in_channels", 3 * 4 * 4)   # 4 x 4 pixel patches per token
            try:
                a = Flux2KleinConfig.from_dict(arch)
            except (TypeError, ValueError) as err:
                raise ValueError(f"model.arch: {err}") from None
        if sum(a.axes_dims_rope) != a.attention_head_dim:
            raise ValueError(f"model.arch.axes_dims_rope: must sum to attention_head_dim={a.attention_head_dim}")
        if a.patch_size != 1 or a.guidance_embeds:
            raise ValueError("model.arch: FLUX.2 [klein] has patch_size 1 and no guidance embedder")
        if cfg.data.kind == "synthetic":
            try:
                p = self.pixel_patch(a)
            except ValueError as err:
                raise ValueError(f"model.arch.in_channels: {err}") from None
            if cfg.data.image_size % p:
                raise ValueError(f"data.image_size: must be a multiple of the pixel patch {p}")
        return a

    def sampling_sigmas(self, steps, shift, latent_shape):
        # klein's shift is not a constant: mu follows the target token count and the step count
        return empirical_mu_sigmas(latent_shape[-1] * latent_shape[-2], steps)

    def flops_layout(self, arch, latent_shape, cond):
        refs = cond.refs if isinstance(cond, ReferenceCondition) else []
        return flops.klein_layout(arch, self.image_tokens(arch, latent_shape), len(cond),
                                  sum(r.shape[-2] * r.shape[-1] for r in refs))


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (ZImageFamily(), Flux2KleinFamily())}


def model_family(name_or_arch) -> ModelFamily:
    """The family of a ``model.family`` name or of an arch config object."""
    if isinstance(name_or_arch, str):
        return FAMILIES[name_or_arch]
    return next(f for f in FAMILIES.values() if isinstance(name_or_arch, f.config_cls))

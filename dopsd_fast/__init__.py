"""dopsd_fast: a kernel-accelerated trainer for D-OPSD (on-policy self-distillation, arXiv 2605.05204).

Data flow: data -> contexts -> roll-out -> teacher/student predictions -> divergence -> optimizer/EMA.
The method lives in ``dopsd_fast.method`` (start with ``method/step.py``); the trainer in ``dopsd_fast.train``;
the fused ops (Triton on CUDA, PyTorch reference elsewhere; ``use_backend`` forces one) in ``dopsd_fast.ops``.
"""
from .method.divergence import rollout_update
from .method.roles import FullRoles, LoRARoles
from .method.rollout import distill_rollout
from .method.schedule import FLUX2, Z_IMAGE, FlowConvention, empirical_mu_sigmas, rollout_sigmas, shifted_sigmas
from .method.step import dopsd_step, sft_step
from .models.adapter import model_family
from .models.flux2_klein import Flux2KleinConfig, Flux2KleinTransformer
from .models.loading import load_zimage_transformer
from .models.loading_flux2 import load_flux2_klein_transformer
from .models.z_image import ZImageConfig, ZImageTransformer
from .nn.lora_linear import LoRALinear
from .ops._dispatch import use_backend
from .ops.ema_update import ema_update
from .ops.epilogues import gated_residual, modulated_layer_norm, modulated_rms_norm, qk_norm_rope
from .ops.fp8_linear import fp8_linear
from .ops.lora_linear import lora_linear
from .ops.merge_state import merge_state
from .ops.packed_attention import PrefixPlan, packed_attention, packed_attention_with_lse, prefix_attention
from .ops.rollout_step import rollout_coefs, rollout_step
from .train.config import Config, ConfigError, load_config
from .train.trainer import SFTTrainer, Trainer, make_trainer

__all__ = [
    # method and model
    "FlowConvention", "FullRoles", "LoRALinear", "LoRARoles", "Z_IMAGE", "ZImageConfig", "ZImageTransformer",
    "distill_rollout", "dopsd_step", "load_zimage_transformer", "rollout_sigmas", "rollout_update", "sft_step",
    "shifted_sigmas",
    "FLUX2", "Flux2KleinConfig", "Flux2KleinTransformer", "empirical_mu_sigmas", "load_flux2_klein_transformer",
    "model_family",
    # fused ops
    "PrefixPlan", "ema_update", "fp8_linear", "gated_residual", "lora_linear", "merge_state", "modulated_layer_norm",
    "modulated_rms_norm", "packed_attention", "packed_attention_with_lse", "prefix_attention", "qk_norm_rope",
    "rollout_coefs", "rollout_step", "use_backend",
    # trainer
    "Config", "ConfigError", "SFTTrainer", "Trainer", "load_config", "make_trainer",
]

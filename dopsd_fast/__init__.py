"""dopsd_fast: a kernel-accelerated trainer for D-OPSD (on-policy self-distillation, arXiv 2605.05204).

Data flow: data -> contexts -> roll-out -> teacher/student predictions -> divergence -> optimizer/EMA.
The method lives in ``dopsd_fast.method`` (start with ``method/step.py``); the trainer in ``dopsd_fast.train``.
"""
from .method.roles import FullRoles, LoRARoles
from .method.schedule import Z_IMAGE, FlowConvention, rollout_sigmas, shifted_sigmas
from .method.step import dopsd_step, sft_step
from .models.z_image import ZImageConfig, ZImageTransformer
from .nn.lora_linear import LoRALinear
from .ops.packed_attention import packed_attention
from .train.config import Config, ConfigError, load_config
from .train.trainer import SFTTrainer, Trainer, make_trainer

__all__ = [
    "Config", "ConfigError", "FlowConvention", "FullRoles", "LoRALinear", "LoRARoles", "SFTTrainer", "Trainer",
    "ZImageConfig", "ZImageTransformer", "Z_IMAGE", "dopsd_step", "load_config", "make_trainer", "packed_attention",
    "rollout_sigmas", "sft_step", "shifted_sigmas",
]

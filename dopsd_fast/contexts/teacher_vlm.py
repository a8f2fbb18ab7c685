"""Teacher context c_t = f_mm(prompt, image): Qwen3-VL whose language model carries the Z-Image text encoder's weights.

As released (method.md 6): every tensor of Qwen3-VL's language model whose name and shape match is overwritten
with the text encoder's (the vision tower and merger stay Qwen3-VL's); one user turn [image, prompt] with no
system prompt (``text_first``: [prompt, image]); the target crop resized into [512^2, 768^2] pixels; the first
1024 rows of the hidden states the student reads (the layers of its ``TextFeatureSpec``: Z-Image
``hidden_states[-2]``, FLUX.2 [klein] 9, 18 and 27 concatenated). Real tokens only for both: the teacher sequence
has no pads (klein's student keeps its pads because klein's pipeline does; the packed transformer takes any length).

**The prompt text** (``prompt_text``): ``templated`` (default) puts the student's chat-templated prompt inside the
teacher's user turn, as the released loop does by side effect (its ``_encode_prompt`` templates the batch's prompt
list in place before the teacher reads it; method.md section 6); ``raw`` puts the prompt itself. FLUX.2 [klein] has
no released VLM loop; the same rule applies with klein's own template (thinking off).

**Prefix reuse.** With ``text_first`` the teacher's token ids start with the student's ``<|im_start|>user\\n`` +
prompt tokens. A causal LM computes those rows identically (so their KV can be taken from the student pass) only
if the two passes agree on everything the rows depend on: the weights (a complete swap), the position ids (0..P-1
in both: Qwen3-VL numbers text before the first image like Qwen3), the rotary scheme and the attention settings.
Qwen3-VL's M-RoPE gives every text token the same (t, h, w) = (p, p, p), so each frequency rotates by p * inv_freq
whichever axis the interleaved sections assign it to: on text-only positions it IS Qwen3's 1-D RoPE, provided
inv_freq (rope theta, head_dim) and the rope type match. The official pair does not: Qwen3-4B uses theta 1e6,
Qwen3-VL-4B 5e6, so the teacher is computed in full and the log says why. ``reuse_blockers`` lists every
difference; reuse is used only when it is empty, and ``tests/contexts/test_teacher_vlm.py`` checks equality.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .qwen_text import HiddenStates, QwenTextEncoder, StudentPass, TextFeatureSpec, chat_prompt

log = logging.getLogger(__name__)

ATTENTION_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                    "hidden_act", "attention_bias")


@dataclass
class SwapReport:
    copied: list[str] = field(default_factory=list)
    unmatched_source: list[str] = field(default_factory=list)     # text-encoder tensors with no same-name/shape target
    kept_target: list[str] = field(default_factory=list)          # language-model tensors that keep Qwen3-VL's weights

    def describe(self) -> str:
        def some(names):
            return f"{len(names)}" + (f" (e.g. {', '.join(names[:3])})" if names else "")
        return (f"copied {len(self.copied)} text-encoder tensors into Qwen3-VL's language model; "
                f"unmatched in the text encoder: {some(self.unmatched_source)}; "
                f"language-model tensors left as Qwen3-VL's: {some(self.kept_target)}")


@torch.no_grad()
def swap_language_model(language_model: torch.nn.Module, text_model: torch.nn.Module) -> SwapReport:
    """Copy every text-encoder tensor into the language model where name and shape match."""
    target = language_model.state_dict()
    report = SwapReport()
    for name, tensor in text_model.state_dict().items():
        if name in target and target[name].shape == tensor.shape:
            target[name].copy_(tensor.to(target[name].dtype))
            report.copied.append(name)
        else:
            shape = tuple(target[name].shape) if name in target else None
            report.unmatched_source.append(name if shape is None else f"{name} {tuple(tensor.shape)} vs {shape}")
    report.kept_target = sorted(set(target) - set(report.copied))
    return report


def _rope(cfg) -> tuple:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return params.get("rope_type", "default"), theta


def reuse_blockers(text_cfg, vl_text_cfg, swap: SwapReport, same_layers: bool, same_dtype: bool) -> list[str]:
    """Why the teacher's prompt-prefix rows could differ from the student's (empty list: provably identical)."""
    reasons = []
    (s_type, s_theta), (t_type, t_theta) = _rope(text_cfg), _rope(vl_text_cfg)
    if s_theta != t_theta:
        reasons.append(f"rope theta differs (Qwen3 {s_theta:g} vs Qwen3-VL {t_theta:g})")
    if s_type != "default" or t_type != "default":
        reasons.append(f"rope scaling ({s_type} / {t_type}) is not plain RoPE")
    for name in ATTENTION_FIELDS:
        a, b = getattr(text_cfg, name, None), getattr(vl_text_cfg, name, None)
        if a != b:
            reasons.append(f"{name} differs ({a} vs {b})")
    if getattr(text_cfg, "use_sliding_window", False):
        reasons.append("the text encoder uses sliding-window attention")
    if swap.kept_target or swap.unmatched_source:
        reasons.append(f"the weight swap is incomplete ({len(swap.kept_target)} language-model tensors not replaced)")
    if not same_layers:
        reasons.append("student and teacher read different hidden-state layers")
    if not same_dtype:
        reasons.append("student and teacher run in different dtypes")
    return reasons


class QwenVLTeacher:
    def __init__(self, vl_model, tokenizer, image_processor, text: QwenTextEncoder, order: str = "image_first",
                 max_tokens: int = 1024, identity: str = "", spec: TextFeatureSpec | None = None,
                 prompt_text: str = "templated"):
        """``spec``: whose ``layers`` the features concatenate; default the student's (``text.spec``).
        ``prompt_text``: ``templated`` | ``raw``, the text in the teacher's user turn (module docstring)."""
        self.vl, self.tokenizer, self.processor, self.order, self.max_tokens = vl_model, tokenizer, image_processor, order, max_tokens
        if prompt_text not in ("templated", "raw"):
            raise ValueError(f"prompt_text must be 'templated' or 'raw', got {prompt_text!r}")
        self.prompt_text, self.text = prompt_text, text
        lm = vl_model.language_model
        total = self.total_layers = lm.config.num_hidden_layers
        self.indices = (spec or text.spec).absolute_layers(total)
        need = max(self.indices)
        if need < total:         # run only the layers the features need, as the student does
            lm.layers = lm.layers[:need]
            lm.config.num_hidden_layers = need
            lm.norm = torch.nn.Identity()
        self.swap = swap_language_model(lm, text.model)
        log.info("teacher context: %s", self.swap.describe())
        self.blockers = reuse_blockers(text.model.config, lm.config, self.swap, self.indices == text.indices,
                                       lm.embed_tokens.weight.dtype == text.model.embed_tokens.weight.dtype)
        if order == "text_first":
            log.info("teacher prefix reuse: %s", "on (student KV reused for the prompt prefix)" if not self.blockers
                     else "off, computed in full: " + "; ".join(self.blockers))
        self.image_token_id = vl_model.config.image_token_id
        self.merge = vl_model.config.vision_config.spatial_merge_size
        self.identity = teacher_identity(identity, text.identity, order, max_tokens, self.indices, prompt_text)

    @classmethod
    def from_pretrained(cls, vl_dir: str | Path, text: QwenTextEncoder, order: str = "image_first",
                        max_tokens: int = 1024, min_pixels: int = 512 * 512, max_pixels: int = 768 * 768,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        spec: TextFeatureSpec | None = None, prompt_text: str = "templated") -> "QwenVLTeacher":
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

        vl_dir = Path(vl_dir)
        if not (vl_dir / "config.json").is_file():
            raise FileNotFoundError(f"{vl_dir / 'config.json'}: missing; context.teacher_model must be a local "
                                    "Qwen3-VL folder (e.g. Qwen3-VL-4B-Instruct)")
        model = Qwen3VLForConditionalGeneration.from_pretrained(str(vl_dir), dtype=dtype, local_files_only=True)
        vl = model.model.to(device).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(str(vl_dir), local_files_only=True)
        pre = vl_dir / "preprocessor_config.json"
        saved = json.loads(pre.read_text()) if pre.is_file() else {}
        vision = model.config.vision_config
        processor = Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size, min_pixels=min_pixels, max_pixels=max_pixels,
            image_mean=saved.get("image_mean", [0.5] * 3), image_std=saved.get("image_std", [0.5] * 3))
        identity = _folder_part(vl_dir, min_pixels, max_pixels, dtype)
        return cls(vl, tokenizer, processor, text, order, max_tokens, identity, spec, prompt_text)

    @property
    def reuses_prefix(self) -> bool:
        return self.order == "text_first" and not self.blockers

    def _inputs(self, prompt: str, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Token ids (1, L) with the image placeholder expanded, pixel patches and the (1, 3) grid."""
        pixels = self.processor(images=[(image.float().cpu() + 1) / 2], do_rescale=False, return_tensors="pt")
        grid = pixels["image_grid_thw"]
        if self.prompt_text == "templated":
            prompt = chat_prompt(self.text.tokenizer, prompt, self.text.spec.enable_thinking)
        parts = [{"type": "image"}, {"type": "text", "text": prompt}]
        if self.order == "text_first":
            parts.reverse()
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                  add_generation_prompt=True)
        pad = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        text = text.replace(pad, pad * int(grid.prod() // self.merge**2), 1)
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        return ids.to(self.device), pixels["pixel_values"].to(self.device), grid.to(self.device)

    @property
    def device(self) -> torch.device:
        return self.vl.language_model.embed_tokens.weight.device

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: list[Tensor], student: StudentPass | None = None) -> list[Tensor]:
        out = []
        for b, (prompt, image) in enumerate(zip(prompts, images)):
            inputs = self._inputs(prompt, image)
            prefix = self._shared_prefix(student, b, inputs[0]) if student is not None and self.reuses_prefix else None
            out.append(self._encode(*inputs, prefix)[: self.max_tokens].clone())
        return out

    @staticmethod
    def _shared_prefix(student: StudentPass, b: int, ids: Tensor) -> tuple[StudentPass, int, int] | None:
        """(pass, sample, P): the first P token ids are equal in both sequences (so are their rows, causally)."""
        s_ids = student.ids[b]
        n = min(len(s_ids), ids.shape[1])
        p = int((s_ids[:n] == ids[0, :n]).int().cumprod(0).sum())
        return (student, b, p) if p > 0 else None

    def _encode(self, ids: Tensor, pixel_values: Tensor, grid: Tensor, prefix) -> Tensor:
        from transformers import DynamicCache

        vl, lm = self.vl, self.vl.language_model
        vision = vl.get_image_features(pixel_values, grid, return_dict=True)
        image_embeds = torch.cat(vision.pooler_output).to(lm.embed_tokens.weight.dtype)
        deepstack = [torch.cat(f) for f in vision.deepstack_features]
        is_image = ids == self.image_token_id
        embeds = lm.embed_tokens(ids).masked_scatter(is_image[..., None], image_embeds)
        positions, _ = vl.get_rope_index(ids, mm_token_type_ids=is_image.int(), image_grid_thw=grid)
        p, cache, head = 0, None, []
        if prefix is not None:
            student, b, p = prefix
            cache = DynamicCache()
            for i, layer in enumerate(cache_layers(student.cache)[: len(lm.layers)]):
                cache.update(layer[0][b:b + 1, :, :p], layer[1][b:b + 1, :, :p], i)
            head = [student.features[b][:p]]
        hooks = HiddenStates(lm.layers, self.indices)
        try:
            kwargs = {_cache_argument(lm): cache} if cache is not None else {}
            out = lm(inputs_embeds=embeds[:, p:], position_ids=positions[:, :, p:], use_cache=cache is not None,
                     visual_pos_masks=is_image[:, p:], deepstack_visual_embeds=deepstack, **kwargs)
            if self.total_layers in self.indices:        # hidden_states[-1] is after the final norm
                hooks.found[self.total_layers] = out.last_hidden_state
            rows = hooks.collect(lambda: embeds[:, p:])[0]
        finally:
            hooks.close()
        return torch.cat(head + [rows])


def teacher_identity(weights: str, text_identity: str, order: str, max_tokens: int, indices: list[int],
                     prompt_text: str) -> str:
    return "qwen3-vl:" + hashlib.sha256(
        f"{weights}|{text_identity}|{order}|{max_tokens}|{indices}|{prompt_text}".encode()).hexdigest()[:16]


def _folder_part(vl_dir: str | Path, min_pixels: int, max_pixels: int, dtype: torch.dtype) -> str:
    from ..data.feature_cache import folder_fingerprint
    return f"{folder_fingerprint(vl_dir)}|{min_pixels}|{max_pixels}|{dtype}"


def folder_identity(vl_dir: str | Path, text_identity: str, spec: TextFeatureSpec, order: str = "image_first",
                    max_tokens: int = 1024, min_pixels: int = 512 * 512, max_pixels: int = 768 * 768,
                    dtype: torch.dtype = torch.float32, prompt_text: str = "templated") -> str:
    """``QwenVLTeacher.from_pretrained(...).identity`` from the folder's files alone (config.json, file list)."""
    config = json.loads((Path(vl_dir) / "config.json").read_text())
    layers = spec.absolute_layers(int(config["text_config"]["num_hidden_layers"]))
    return teacher_identity(_folder_part(vl_dir, min_pixels, max_pixels, dtype), text_identity, order, max_tokens,
                            layers, prompt_text)


def _cache_argument(model) -> str:
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache``."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_layers(cache) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) per layer of a transformers KV cache (DynamicCache layers, or a legacy tuple)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]

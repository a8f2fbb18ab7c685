"""Student context c_s = f_text(prompt): a Qwen3 text encoder's hidden states, one configurable encoder class.

Z-Image-Turbo: chat template with thinking on, at most 512 tokens, ``hidden_states[-2]``, real tokens only.
FLUX.2 [klein]: ``enable_thinking=False``, ``hidden_states`` 9, 18 and 27 concatenated, pads kept to 512.
The model is cut after the last layer a spec needs (``load_qwen3_text_encoder(num_layers=...)``): Z-Image runs
35 of Qwen3-4B's 36 layers, klein 27.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class TextFeatureSpec:
    layers: tuple[int, ...] = (-2,)     # indices into hidden_states (0 = embeddings, -1 = final norm output)
    max_tokens: int = 512
    keep_padding: bool = False          # True: every prompt gives max_tokens rows (pads included)
    enable_thinking: bool = True        # Qwen3 template: False appends an empty <think></think> block

    def absolute_layers(self, num_hidden_layers: int) -> list[int]:
        n = num_hidden_layers + 1
        out = []
        for i in self.layers:
            if not -n <= i < n:
                raise ValueError(f"hidden_states index {i} out of range for a {num_hidden_layers}-layer encoder")
            out.append(i % n)
        return out

    def layers_to_run(self, num_hidden_layers: int) -> int:
        """Decoder layers needed; hidden_states[-1] is after the final norm, so it needs all of them."""
        return max(self.absolute_layers(num_hidden_layers))


Z_IMAGE_TEXT = TextFeatureSpec()
KLEIN_TEXT = TextFeatureSpec(layers=(9, 18, 27), keep_padding=True, enable_thinking=False)


def chat_prompt(tokenizer, prompt: str, enable_thinking: bool) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)


class HiddenStates:
    """Forward hooks that keep the outputs of chosen decoder layers (hidden_states[i] = output of layer i)."""

    def __init__(self, layers: torch.nn.ModuleList, indices: list[int]):
        self.indices, self.found = indices, {}
        self.handles = [layers[i - 1].register_forward_hook(self._keep(i)) for i in set(indices) if i > 0]

    def _keep(self, i: int):
        def hook(module, args, output):
            self.found[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def collect(self, embed) -> Tensor:
        return torch.cat([embed() if i == 0 else self.found[i] for i in self.indices], dim=-1)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class QwenTextEncoder:
    """prompts -> list of (L_i, hidden * len(layers)) features (real tokens; or max_tokens rows with keep_padding)."""

    def __init__(self, model, tokenizer, spec: TextFeatureSpec = Z_IMAGE_TEXT, full_layers: int | None = None,
                 identity: str | None = None):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        total = self.total_layers = full_layers or model.config.num_hidden_layers
        self.indices = spec.absolute_layers(total)
        if max(self.indices) > len(model.layers) or (max(self.indices) == total and len(model.layers) < total):
            raise ValueError(f"spec {spec} needs layer {max(self.indices)}, the model keeps {len(model.layers)}")
        self.feat_dim = model.config.hidden_size * len(self.indices)
        self.identity = identity or _weights_identity(model, spec)

    @classmethod
    def from_pretrained(cls, text_encoder_dir: str | Path, tokenizer_dir: str | Path,
                        spec: TextFeatureSpec = Z_IMAGE_TEXT, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "QwenTextEncoder":
        from transformers import AutoTokenizer

        from ..models.loading import load_qwen3_text_encoder, read_component_config

        config = read_component_config(Path(text_encoder_dir), "text_encoder/")
        total = int(config["num_hidden_layers"])
        model = load_qwen3_text_encoder(text_encoder_dir, dtype, device, spec.layers_to_run(total))
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        return cls(model, tokenizer, spec, total, folder_identity(text_encoder_dir, spec, dtype))

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def token_ids(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        texts = [chat_prompt(self.tokenizer, p, self.spec.enable_thinking) for p in prompts]
        self.tokenizer.padding_side = "right"       # real tokens keep positions 0..L-1 (the teacher's prefix reuse)
        enc = self.tokenizer(texts, padding="max_length" if self.spec.keep_padding else "longest",
                             max_length=self.spec.max_tokens, truncation=True, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def __call__(self, prompts: list[str]) -> list[Tensor]:
        return self.encode(prompts).features

    @torch.no_grad()
    def encode(self, prompts: list[str], keep_cache: bool = False) -> "StudentPass":
        """Features plus, with ``keep_cache``, the token ids and KV cache a teacher may reuse for a shared prefix."""
        ids, mask = self.token_ids(prompts)
        hooks = HiddenStates(self.model.layers, self.indices)
        try:
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=keep_cache)
            if self.total_layers in self.indices:        # hidden_states[-1] is after the final norm
                hooks.found[self.total_layers] = out.last_hidden_state
            feats = hooks.collect(lambda: self.model.embed_tokens(ids))
        finally:
            hooks.close()
        rows = feats if self.spec.keep_padding else [f[m.bool()] for f, m in zip(feats, mask)]
        cache = (getattr(out, "cache", None) or getattr(out, "past_key_values", None)) if keep_cache else None
        return StudentPass(ids, [r.clone() for r in rows], cache)


def folder_identity(text_encoder_dir: str | Path, spec: TextFeatureSpec, dtype: torch.dtype) -> str:
    """``QwenTextEncoder.from_pretrained(...).identity`` from the folder's file list alone (no weights read)."""
    from ..data.feature_cache import folder_fingerprint

    h = hashlib.sha256(f"{folder_fingerprint(text_encoder_dir)}|{asdict(spec)}|{dtype}".encode()).hexdigest()
    return "qwen3-text:" + h[:16]


def folder_feature_dim(text_encoder_dir: str | Path, spec: TextFeatureSpec) -> int:
    """``QwenTextEncoder.from_pretrained(...).feat_dim`` from the folder's config.json."""
    from ..models.loading import read_component_config

    config = read_component_config(Path(text_encoder_dir), "text_encoder/")
    return int(config["hidden_size"]) * len(spec.absolute_layers(int(config["num_hidden_layers"])))


@dataclass
class StudentPass:
    """A student encoder call: right-padded token ids (B, L), feature rows per prompt, KV cache (or None)."""
    ids: Tensor
    features: list[Tensor]
    cache: object = None


def _weights_identity(model, spec: TextFeatureSpec) -> str:
    """Content hash of the weights (in-memory models: tests and tiny runs)."""
    h = hashlib.sha256(json.dumps(asdict(spec)).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return "qwen3-text:" + h.hexdigest()[:16]

"""Teacher context c_t of FLUX.2 [klein]'s "reference" variant (the authors' edit branch, method.md section 6).

The teacher reads the text features of ``f"{prompt} {reference_prompt}"`` and the target image's clean latents as
reference tokens (the model gives them RoPE time id 10 and slices its output back to the target tokens); the
student reads the plain prompt. With a causal text encoder the student prompt's tokens are a prefix of the
teacher's at the same positions (right padding), so their rows are identical in every layer:
:func:`encode_with_shared_prefix` runs the student once and continues the teacher from its KV cache (exact;
method.md section 12; the saving is the prefix, small next to the DiT).
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ..models.flux2_klein import ReferenceCondition
from .qwen_text import HiddenStates, QwenTextEncoder


class ReferenceTeacherContext:
    def __init__(self, text_encoder, codec, reference_prompt: str):
        self.text, self.codec, self.reference_prompt = text_encoder, codec, reference_prompt

    def teacher_prompt(self, prompt: str) -> str:
        return f"{prompt} {self.reference_prompt}"

    def conditions(self, feats: list[Tensor], images: list[Tensor]) -> list[ReferenceCondition]:
        return [ReferenceCondition(f, [self.codec.encode(img)]) for f, img in zip(feats, images)]

    def __call__(self, prompts: list[str], images: list[Tensor]) -> list[ReferenceCondition]:
        """images: (3, H, W) targets in [-1, 1] -> one ReferenceCondition per sample."""
        return self.conditions(self.text([self.teacher_prompt(p) for p in prompts]), images)

    def student_and_teacher(self, prompts: list[str], images: list[Tensor]):
        """(c_s, c_t) in one encoder pass over the shared prefix (a QwenTextEncoder), else two plain calls."""
        teacher_prompts = [self.teacher_prompt(p) for p in prompts]
        if isinstance(self.text, QwenTextEncoder):
            c_s, c_t = encode_with_shared_prefix(self.text, prompts, teacher_prompts)
        else:
            c_s, c_t = self.text(prompts), self.text(teacher_prompts)
        return c_s, self.conditions(c_t, images)


def _rows(encoder: QwenTextEncoder, feats: Tensor, mask: Tensor) -> Tensor:
    return feats if encoder.spec.keep_padding else feats[mask.bool()]


@torch.no_grad()
def encode_with_shared_prefix(encoder: QwenTextEncoder, student_prompts: list[str], teacher_prompts: list[str]
                              ) -> tuple[list[Tensor], list[Tensor]]:
    """Features of both prompt lists (as ``encoder(...)`` returns them), the teacher's continuing each student's
    KV cache after their longest common token prefix (per sample: prefixes differ in length)."""
    if encoder.tokenizer.padding_side != "right":
        raise ValueError("prefix reuse needs right padding: with left padding the shared tokens sit at other positions")
    model, student, teacher = encoder.model, [], []
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed in 5.2x
    for s_prompt, t_prompt in zip(student_prompts, teacher_prompts):
        (s_ids, s_mask), (t_ids, t_mask) = encoder.token_ids([s_prompt]), encoder.token_ids([t_prompt])
        real_s, real_t = s_ids[0, s_mask[0].bool()], t_ids[0, t_mask[0].bool()]
        n = int(torch.cumprod(real_s[: len(real_t)] == real_t[: len(real_s)], 0).sum())   # common prefix length
        hooks = HiddenStates(model.layers, encoder.indices)
        try:
            out = model(input_ids=s_ids, attention_mask=s_mask, use_cache=True)
            if encoder.total_layers in encoder.indices:
                hooks.found[encoder.total_layers] = out.last_hidden_state
            s_feats = hooks.collect(lambda: model.embed_tokens(s_ids))
            cache = getattr(out, "cache", None) or out.past_key_values
            cache.crop(n - s_ids.shape[1])      # keep the student's K/V of the shared prefix only (negative = drop)
            hooks.found.clear()
            suffix = t_ids[:, n:]
            out = model(input_ids=suffix, attention_mask=t_mask, use_cache=True, **{cache_arg: cache})
            if encoder.total_layers in encoder.indices:
                hooks.found[encoder.total_layers] = out.last_hidden_state
            t_feats = torch.cat([s_feats[:, :n], hooks.collect(lambda: model.embed_tokens(suffix))], dim=1)
        finally:
            hooks.close()
        student.append(_rows(encoder, s_feats[0], s_mask[0]).clone())
        teacher.append(_rows(encoder, t_feats[0], t_mask[0]).clone())
    return student, teacher

"""Teacher context c_t of FLUX.2 [klein]'s "reference" variant (the authors' edit branch, method.md section 6).

The teacher reads the text features of ``f"{prompt} {reference_prompt}"`` and the target image's clean latents as
reference tokens (the model gives them RoPE time id 10 and slices its output back to the target tokens); the
student reads the plain prompt. With a causal text encoder the student prompt's tokens are a prefix of the
teacher's at the same positions (right padding), so their rows are identical in every layer: given the student's
pass (``QwenTextEncoder.encode(..., keep_cache=True)``) the teacher text continues its KV cache after the shared
prefix, exactly (method.md section 12; the saving is the prefix, small next to the DiT). Same call signature as
``teacher_vlm.QwenVLTeacher``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models.flux2_klein import ReferenceCondition
from .qwen_text import HiddenStates, QwenTextEncoder, StudentPass
from .teacher_vlm import _cache_argument, cache_layers


class ReferenceTeacherContext:
    reuses_prefix = True

    def __init__(self, text_encoder, codec, reference_prompt: str):
        self.text, self.codec, self.reference_prompt = text_encoder, codec, reference_prompt

    def teacher_prompt(self, prompt: str) -> str:
        return f"{prompt} {self.reference_prompt}"

    def __call__(self, prompts: list[str], images: list[Tensor], student: StudentPass | None = None
                 ) -> list[ReferenceCondition]:
        """images: (3, H, W) targets in [-1, 1] -> one ReferenceCondition per sample. ``student``: the student's
        pass over the same prompts (with its KV cache), whose shared prefix the teacher text then reuses."""
        teacher_prompts = [self.teacher_prompt(p) for p in prompts]
        if student is not None and student.cache is not None:
            feats = continue_student_pass(self.text, student, teacher_prompts)
        else:
            feats = self.text(teacher_prompts)
        return [ReferenceCondition(f, [self.codec.encode(img)]) for f, img in zip(feats, images)]


@torch.no_grad()
def continue_student_pass(encoder: QwenTextEncoder, student: StudentPass, prompts: list[str]) -> list[Tensor]:
    """``encoder(prompts)``, computed from the student's pass: per sample, the rows and K/V of the longest common
    token prefix are the student's, and only the rest runs (prefix lengths differ per sample)."""
    if encoder.tokenizer.padding_side != "right":
        raise ValueError("prefix reuse needs right padding: with left padding the shared tokens sit at other positions")
    from transformers import DynamicCache

    ids, mask = encoder.token_ids(prompts)
    model, layers, out = encoder.model, cache_layers(student.cache), []
    for b in range(len(prompts)):
        n = min(student.ids.shape[1], ids.shape[1])
        p = int((student.ids[b, :n] == ids[b, :n]).int().cumprod(0).sum())     # shared prefix length
        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k[b:b + 1, :, :p], v[b:b + 1, :, :p], i)
        suffix = ids[b:b + 1, p:]
        hooks = HiddenStates(model.layers, encoder.indices)
        try:
            result = model(input_ids=suffix, attention_mask=mask[b:b + 1], use_cache=True,
                           **{_cache_argument(model): cache})
            if encoder.total_layers in encoder.indices:        # hidden_states[-1] is after the final norm
                hooks.found[encoder.total_layers] = result.last_hidden_state
            rows = torch.cat([student.features[b][:p], hooks.collect(lambda: model.embed_tokens(suffix))[0]])
        finally:
            hooks.close()
        out.append(rows if encoder.spec.keep_padding else rows[: int(mask[b].sum())])
    return out

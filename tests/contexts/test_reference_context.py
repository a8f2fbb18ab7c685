"""klein's reference teacher context: the teacher's text continues the student's KV cache over the shared prefix."""
import pytest
import torch

from dopsd_fast.contexts.qwen_text import QwenTextEncoder, TextFeatureSpec
from dopsd_fast.contexts.reference import ReferenceTeacherContext, continue_student_pass
from dopsd_fast.data.latents import PatchedPixelLatents
from dopsd_fast.models.flux2_klein import ReferenceCondition

PROMPTS = ["a red cat sitting on a green mat, studio light", "x", "一只猫"]
SENTENCE = "Make the main subject (facial/ip details), background, and overall composition consistent with the reference image."
SPECS = {"klein": TextFeatureSpec(layers=(1, 2, 3), max_tokens=64, keep_padding=True, enable_thinking=False),
         "zimage": TextFeatureSpec()}


@pytest.mark.parametrize("spec", SPECS, ids=list(SPECS))
def test_prefix_reuse_equals_encoding_the_teacher_prompt(tiny_root, spec):
    enc = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", SPECS[spec])
    ctx = ReferenceTeacherContext(enc, PatchedPixelLatents(2), SENTENCE)
    teacher_prompts = [ctx.teacher_prompt(p) for p in PROMPTS]
    student = enc.encode(PROMPTS, keep_cache=True)
    for got, want in zip(continue_student_pass(enc, student, teacher_prompts), enc(teacher_prompts)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)    # observed 0 to 2e-8 (other GEMM shapes)
    for s_ids, t_ids in zip(student.ids, enc.token_ids(teacher_prompts)[0]):
        assert (s_ids[:4] == t_ids[:4]).all() and not torch.equal(s_ids, t_ids)   # template head + prompt start shared


def test_reference_conditions_with_and_without_the_student_pass(tiny_root):
    enc = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", SPECS["klein"])
    ctx = ReferenceTeacherContext(enc, PatchedPixelLatents(2), SENTENCE)
    images = [torch.rand(3, 8, 12) * 2 - 1 for _ in PROMPTS]
    reused = ctx(PROMPTS, images, enc.encode(PROMPTS, keep_cache=True))
    plain = ctx(PROMPTS, images)
    assert all(isinstance(c, ReferenceCondition) and c.refs[0].shape == (12, 4, 6) for c in reused)
    for a, b in zip(reused, plain):
        torch.testing.assert_close(a.text, b.text, rtol=0, atol=1e-6)


def test_left_padding_is_refused(tiny_root):
    enc = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", SPECS["klein"])
    student = enc.encode(PROMPTS[:1], keep_cache=True)
    enc.tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="right padding"):
        continue_student_pass(enc, student, [PROMPTS[0] + " more"])

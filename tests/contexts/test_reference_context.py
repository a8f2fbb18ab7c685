"""klein's reference teacher context: the teacher's text continues the student's KV cache over the shared prefix."""
import pytest
import torch

from dopsd_fast.contexts.qwen_text import QwenTextEncoder, TextFeatureSpec
from dopsd_fast.contexts.reference import ReferenceTeacherContext, encode_with_shared_prefix
from dopsd_fast.data.latents import PatchedPixelLatents
from dopsd_fast.models.flux2_klein import ReferenceCondition

PROMPTS = ["a red cat sitting on a green mat, studio light", "x", "一只猫"]
SENTENCE = "Make the main subject (facial/ip details), background, and overall composition consistent with the reference image."
SPECS = {"klein": TextFeatureSpec(layers=(1, 2, 3), max_tokens=64, keep_padding=True, enable_thinking=False),
         "zimage": TextFeatureSpec()}


@pytest.mark.parametrize("spec", SPECS, ids=list(SPECS))
def test_prefix_reuse_equals_encoding_both_prompts(tiny_root, spec):
    enc = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", SPECS[spec])
    ctx = ReferenceTeacherContext(enc, PatchedPixelLatents(2), SENTENCE)
    teacher_prompts = [ctx.teacher_prompt(p) for p in PROMPTS]
    student, teacher = encode_with_shared_prefix(enc, PROMPTS, teacher_prompts)
    for got, want in zip(student + teacher, enc(PROMPTS) + enc(teacher_prompts)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)    # observed 0 to 2e-8 (different GEMM shapes)
    for s_ids, t_ids in zip(enc.token_ids(PROMPTS)[0], enc.token_ids(teacher_prompts)[0]):
        assert (s_ids[:4] == t_ids[:4]).all() and not torch.equal(s_ids, t_ids)   # template head + prompt start shared, then not


def test_student_and_teacher_contexts(tiny_root):
    enc = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", SPECS["klein"])
    ctx = ReferenceTeacherContext(enc, PatchedPixelLatents(2), SENTENCE)
    images = [torch.rand(3, 8, 12) * 2 - 1 for _ in PROMPTS]
    c_s, c_t = ctx.student_and_teacher(PROMPTS, images)
    assert all(isinstance(c, ReferenceCondition) and c.refs[0].shape == (12, 4, 6) for c in c_t)
    torch.testing.assert_close(torch.stack(c_s), torch.stack(enc(PROMPTS)), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.stack([c.text for c in c_t]), torch.stack([c.text for c in ctx(PROMPTS, images)]),
                               rtol=0, atol=1e-6)


def test_left_padding_is_refused(tiny_root):
    enc = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", SPECS["klein"])
    enc.tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="right padding"):
        encode_with_shared_prefix(enc, PROMPTS[:1], [PROMPTS[0] + " more"])

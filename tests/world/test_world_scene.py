"""The miniature world: deterministic draws, exact palette, the held-out word never in pretraining, encoders."""
import random

import pytest
import torch
import torch.nn.functional as F

from dopsd_fast.world.data import ConceptPairs, draw
from dopsd_fast.world.metrics import palette_purity
from dopsd_fast.world.scene import CONCEPT_WORD, CONCEPTS, COLOURS, SHAPES, SIZE, concept_pairs

pytest.importorskip("transformers")
from dopsd_fast.world.encoders import WorldEncoders, token_ids  # noqa: E402


def test_draws_are_deterministic_by_seed():
    a, b = draw(random.Random(3), 12), draw(random.Random(3), 12)
    assert a.prompts == b.prompts
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))


def test_renderings_are_on_palette_and_blur_is_not():
    d = draw(random.Random(1), 32)
    images = torch.stack(d.images)
    assert images.shape == (32, 3, SIZE, SIZE)
    assert torch.all(palette_purity(images) == 1.0)
    blurred = F.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
    assert palette_purity(blurred).mean() < 0.95


def test_concept_word_is_held_out_of_pretraining():
    prompts = draw(random.Random(0), 3000).prompts
    assert not any(CONCEPT_WORD in p for p in prompts)
    assert all(token_ids(p) for p in prompts)          # every word is in the vocabulary
    assert sum(p == "" for p in prompts) > 0          # null captions exist (for CFG)


def test_concept_pairs_share_one_caption_and_differ_in_image():
    pairs = ConceptPairs()
    assert len(pairs) == 4 and {tuple(pairs[i].captions) for i in range(4)} == {(f"a {CONCEPT_WORD}",)}
    images = [img for img, _ in concept_pairs()]
    assert all(not torch.equal(images[0], im) for im in images[1:])


def test_each_concept_shows_its_colour_in_four_scenes():
    for word, c in CONCEPTS.items():
        pairs = ConceptPairs(word=word)
        colour = (torch.tensor(COLOURS[c.colour]) * 2 - 1).view(3, 1, 1)
        for i in range(4):
            assert (pairs.image(i) == colour).all(dim=0).any(), word      # the object is drawn in the concept colour
        assert len({tuple(pairs.image(i).flatten().tolist()) for i in range(4)}) == 4
        captions = [pairs.captions(i)[0] for i in range(4)]
        assert captions == ([f"a {word} {shape}" for shape in SHAPES] if c.adjective else [f"a {word}"] * 4)


def test_multimodal_encoder_shares_the_language_model_and_ignores_batch_padding():
    enc = WorldEncoders(seed=0).eval()
    img = torch.rand(3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        alone = enc(["a red circle on navy"])[0]
        batched = enc(["a red circle on navy", "a small blue square at the left on a grey background"])[0]
        mm = enc(["a red circle on navy"], [img])[0]
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5)
    n_img = mm.shape[0] - alone.shape[0]
    assert n_img == (SIZE // 4) ** 2
    # causal LM, image after <bos>: the <bos> row is identical, text rows differ (they attend to the image)
    torch.testing.assert_close(mm[0], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mm[n_img + 1:], alone[1:])
    assert not enc.language.embed_tokens.weight.requires_grad

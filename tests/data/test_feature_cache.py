"""Feature cache: keyed by content hash + encoder identity; hits, misses, invalidation, torn entries."""
import torch

from dopsd_fast.data.feature_cache import FeatureCache, folder_fingerprint, image_key, pair_key, text_key


def test_hit_miss_and_invalidation(tmp_path):
    g = torch.Generator().manual_seed(0)
    image, value = torch.rand(3, 16, 24, generator=g), torch.randn(7, 5, generator=g)
    cache = FeatureCache(tmp_path, "teacher_mm", "enc:abc")
    key = pair_key("a cat", image)
    assert cache.get(key) is None
    cache.put(key, value)
    torch.testing.assert_close(cache.get(key), value, rtol=0, atol=0)
    assert (cache.hits, cache.misses) == (1, 1)
    # a new run (new object) reuses the entry
    assert FeatureCache(tmp_path, "teacher_mm", "enc:abc").get(key) is not None
    # edited image, edited caption, other encoder: misses
    edited = image.clone()
    edited[0, 0, 0] += 1e-3
    assert pair_key("a cat", edited) != key and pair_key("a cat.", image) != key
    assert image_key(image[:, :, :16]) != image_key(image[:, :, :16].reshape(3, 8, 32))
    assert FeatureCache(tmp_path, "teacher_mm", "enc:def").get(key) is None
    assert text_key("a") != text_key("a ")


def test_torn_entry_is_a_miss_and_rewritten(tmp_path):
    cache = FeatureCache(tmp_path, "student_text", "enc")
    key = text_key("a dog")
    cache.put(key, torch.ones(2, 3))
    path = next(tmp_path.rglob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:20])
    assert cache.get(key) is None and not path.exists()
    cache.put(key, torch.full((2, 3), 2.0))
    assert cache.get(key)[0, 0] == 2.0
    assert not list(tmp_path.rglob("*.tmp*"))


def test_folder_fingerprint_changes_with_any_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"1234")
    before = folder_fingerprint(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"12345")
    assert folder_fingerprint(tmp_path) != before

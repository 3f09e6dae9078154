"""Image decoding for any mode/size, and the content-keyed feature cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from busdiff.evaluate.features import FeatureCache, FeatureExtractor, ImageItem, read_rgb, with_hashes
from busdiff.evaluate.fidelity import fid
from busdiff.evaluate.inception import resolve_weights
from tests.unit.evaluate_fixture import fresh_cache_dir, shared_weights, synthetic_folder


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 200, 200),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),
        ("I;16", 65535, 255),
        ("1", 1, 255),
        ("P", 3, None),
        ("F", 0.5, 128),
    ],
)
def test_read_rgb_accepts_every_mode(tmp_path, mode, value, expected):
    path = tmp_path / f"img.{'tiff' if mode == 'F' else 'png'}"
    Image.new(mode, (20, 12), value).save(path)
    arr = read_rgb(path)
    assert arr.shape == (12, 20, 3) and arr.dtype == np.uint8
    if expected is not None:
        assert tuple(np.atleast_1d(arr[0, 0]).tolist()) == tuple(np.broadcast_to(expected, 3).tolist())


def test_read_rgb_names_an_undecodable_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png: cannot decode image"):
        read_rgb(bad)


@pytest.fixture(scope="module")
def weights():
    return shared_weights()


def test_features_are_cached_by_content(weights, tmp_path):
    root = synthetic_folder(tmp_path / "syn", 1, size=64)
    items = [ImageItem(p.stem, str(p), p.parent.name) for p in sorted(root.rglob("*.png"))]
    # a set may mix sizes and modes: one image resized and made grayscale
    Image.open(items[0].path).convert("L").resize((48, 80)).save(items[0].path)
    cache_dir = tmp_path / "cache"

    first = FeatureExtractor(weights, cache_dir)
    a = first.features(items)
    assert a.shape == (3, 2048) and first.stats.n_computed == 3

    again = FeatureExtractor(weights, cache_dir)
    b = again.features(items)
    assert again.stats.n_computed == 0 and again.stats.n_cached == 3
    np.testing.assert_array_equal(a, b)
    assert fid(a, b) == pytest.approx(0, abs=1e-6)

    # the key is the content, not the name: a renamed copy hits the cache
    copy = tmp_path / "renamed.png"
    shutil.copy(items[1].path, copy)
    c = again.features([ImageItem("copy", str(copy))])
    assert again.stats.n_computed == 0
    np.testing.assert_array_equal(c[0], a[1])

    # other weights (another extractor id) never read these features
    assert FeatureCache(cache_dir, "other-extractor").get([items[0].sha256 or "x"]) == {}


def test_features_computed_on_another_device_are_not_reused(tmp_path):
    items = [ImageItem(p.stem, str(p)) for p in sorted(synthetic_folder(tmp_path / "s", 1).rglob("*.png"))]
    cache_dir = fresh_cache_dir(tmp_path / "cache")
    weights = resolve_weights("auto", cache_dir, download_timeout_s=0)
    FeatureExtractor(weights, cache_dir, device="cpu").features(items)
    shas = [it.sha256 for it in with_hashes(items)]
    assert len(FeatureExtractor(weights, cache_dir, device="cpu").cache.get(shas)) == 3
    # CUDA convolutions (TF32 by default) give other last bits: a GPU run must not read CPU features
    gpu = FeatureExtractor(weights, cache_dir, device="cuda")
    assert gpu.cache.get(shas) == {}
    assert "cpu-fp32" in FeatureExtractor(weights, cache_dir).stats.extractor_id

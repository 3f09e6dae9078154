"""SSIM and the nearest-training-image audit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from busdiff.evaluate.features import ImageItem
from busdiff.evaluate.memorization import audit, gray, nearest, ssim
from tests.unit.evaluate_fixture import real_phantom


def test_ssim_properties():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (40, 40))
    assert ssim(x, x) == pytest.approx(1.0)
    noisy = [np.clip(x + rng.normal(0, s, x.shape), 0, 255) for s in (5, 20, 60)]
    scores = [ssim(x, n) for n in noisy]
    assert scores[0] > scores[1] > scores[2] > 0
    assert ssim(x, noisy[1]) == pytest.approx(ssim(noisy[1], x))
    # a batch gives the same numbers as pairs one at a time
    batch = ssim(np.stack([x, x]), np.stack(noisy[:2]))
    np.testing.assert_allclose(batch, scores[:2])
    # two constant images of different brightness: only the luminance term differs
    c = (2 * 100 * 150 + (0.01 * 255) ** 2) / (100**2 + 150**2 + (0.01 * 255) ** 2)
    assert ssim(np.full((16, 16), 100.0), np.full((16, 16), 150.0)) == pytest.approx(c)
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, x[:30])


def test_nearest_by_cosine():
    refs = np.eye(4)
    idx, cos = nearest(np.array([[0.1, 2.0, 0, 0], [0, 0, 0, -1.0]]), refs)
    assert idx.tolist()[0] == 1 and cos[0] == pytest.approx(2.0 / np.hypot(0.1, 2.0))
    assert cos[1] == pytest.approx(0.0)


def test_audit_flags_a_copied_training_image(tmp_path):
    root = real_phantom(tmp_path / "busi", 4)
    train = [
        ImageItem(f"benign_{i}", str(root / "benign" / f"benign ({i}).png"), "benign") for i in (1, 2, 3)
    ]
    held = [ImageItem("benign_4", str(root / "benign" / "benign (4).png"), "benign")]
    syn_dir = tmp_path / "syn"
    syn_dir.mkdir()
    shutil.copy(train[1].path, syn_dir / "copy.png")
    shutil.copy(root / "malignant" / "malignant (1).png", syn_dir / "other.png")
    synthetic = [
        ImageItem("benign/copy", str(syn_dir / "copy.png"), "benign"),
        ImageItem("benign/other", str(syn_dir / "other.png"), "benign"),
    ]
    # features: the copy's vector equals its source's; the other image points elsewhere
    rng = np.random.default_rng(0)
    train_f = rng.normal(size=(3, 16))
    syn_f = np.stack([train_f[1], rng.normal(size=16)])
    held_f = rng.normal(size=(1, 16))

    out = audit(
        synthetic,
        syn_f,
        train,
        train_f,
        held,
        held_f,
        ssim_size=64,
        near_copy_cosine=0.99,
        near_copy_ssim=0.9,
    )
    copy = out["rows"][0]
    assert copy["nearest_id"] == "benign_2" and copy["cosine"] == pytest.approx(1.0)
    assert copy["ssim"] == pytest.approx(1.0)
    assert [r["id"] for r in out["near_copies"]] == ["benign/copy"]
    assert out["real_baseline"]["cosine"]["n"] == 1 and out["synthetic"]["ssim"]["n"] == 2
    assert gray(copy["path"], 32).shape == (32, 32)

"""Precision, recall, density, coverage: known answers, the definitions written out, torch-fidelity's prc,
and the small-set guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_prc import prc_features_to_metric

from busdiff.evaluate.fidelity import fidelity_row
from busdiff.evaluate.prdc import METRICS, prdc, too_small


def _features(n: int, d: int = 64, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, d)) + shift).astype(np.float32)


def _by_definition(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al.'s definitions, one image at a time (B(x, r): the open ball of the prdc package)."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def radius(x: np.ndarray, s: np.ndarray) -> float:
        return np.sort(np.linalg.norm(s - x, axis=1))[k]  # [0] is x itself

    r_real = [radius(x, real) for x in real]
    r_fake = [radius(y, fake) for y in fake]
    d = lambda x, y: float(np.linalg.norm(x - y))  # noqa: E731
    balls = [[d(x, y) < r for x, r in zip(real, r_real, strict=True)] for y in fake]
    return {
        "precision": np.mean([any(b) for b in balls]),
        "recall": np.mean([any(d(x, y) < r for y, r in zip(fake, r_fake, strict=True)) for x in real]),
        "density": np.mean([sum(b) for b in balls]) / k,
        "coverage": np.mean([min(d(x, y) for y in fake) < r for x, r in zip(real, r_real, strict=True)]),
    }


def test_identical_sets_score_one_and_far_apart_sets_zero():
    x = _features(40)
    assert prdc(x, x) == dict.fromkeys(METRICS, 1.0)
    assert prdc(x, x + 100) == dict.fromkeys(METRICS, 0.0)
    # the same through a fidelity row (distances from the shared Gram matrix)
    syn = fidelity_row(x, x, x, bootstrap=0)["synthetic_vs_held_out"]
    assert {m: syn[m] for m in METRICS} == pytest.approx(dict.fromkeys(METRICS, 1.0))
    far = fidelity_row(x + 100, x, x, bootstrap=0)["synthetic_vs_held_out"]
    assert {m: far[m] for m in METRICS} == dict.fromkeys(METRICS, 0.0)


@pytest.mark.parametrize("k", [3, 5])
def test_equal_to_the_definitions_and_to_the_row(k):
    real, fake = _features(50, seed=1), _features(35, seed=2, shift=0.15)
    ref = _by_definition(real, fake, k)
    assert prdc(real, fake, k) == pytest.approx(ref, abs=1e-12)
    row = fidelity_row(fake, real, _features(60, seed=3), nearest_k=k, bootstrap=0)["synthetic_vs_held_out"]
    assert {m: row[m] for m in METRICS} == pytest.approx(ref, abs=1e-12)


def test_precision_and_recall_equal_torch_fidelity_prc_at_its_k():
    # torch-fidelity 0.4: input1 (features_1) generated, input2 real; k=3 by default.
    real, fake = _features(70, seed=4), _features(50, seed=5, shift=0.2)
    tf = prc_features_to_metric(
        torch.from_numpy(fake),
        torch.from_numpy(real),
        prc_neighborhood=3,
        prc_batch_size=10000,
        save_cpu_ram=False,
        verbose=False,
    )
    ours = prdc(real, fake, nearest_k=3)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1  # a case where the two can differ
    # equal up to torch's float32 mean (one image more or less would be 1/50 or 1/70 apart)
    assert ours["precision"] == pytest.approx(tf["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(tf["recall"], abs=1e-6)


def test_a_collapsed_generator_is_precise_but_neither_recalls_nor_covers():
    real = _features(60, seed=6)
    rng = np.random.default_rng(7)
    fake = real[rng.integers(0, 3, 40)] + 0.01 * rng.normal(size=(40, real.shape[1]))  # 3 modes only
    r, alike = prdc(real, fake), prdc(real, _features(40, seed=8))
    assert r["precision"] == 1.0 and alike["precision"] < 1
    assert r["recall"] < 0.1 < 0.5 < alike["recall"]
    assert r["coverage"] < 0.5 * alike["coverage"]


def test_sets_of_k_or_fewer_images_are_skipped_with_the_reason():
    assert too_small({"synthetic": 6, "held-out real": 5}, 5) == (
        "precision/recall/density/coverage need more than nearest_k=5 images per set (held-out real 5)"
    )
    assert too_small({"synthetic": 6, "held-out real": 6}, 5) is None
    with pytest.raises(ValueError, match="nearest_k=5"):
        prdc(_features(5), _features(20))
    row = fidelity_row(_features(4), _features(20, seed=1), _features(30, seed=2), bootstrap=0)
    for side in ("synthetic_vs_held_out", "floor"):
        assert all(row[side][m] is None for m in METRICS)
        assert "nearest_k=5" in row[side]["prdc_skipped"]
    assert row["synthetic_vs_held_out"]["fid"] > 0  # FID/KID still reported
    ok = fidelity_row(_features(4), _features(20, seed=1), _features(30, seed=2), nearest_k=3, bootstrap=0)
    assert ok["synthetic_vs_held_out"]["precision"] is not None and ok["floor"]["prdc_skipped"] is None

"""FID/KID from features: equal to torch-fidelity's own estimators, subset sizes, intervals, floors, and the
weighted (resampled) figures equal to those of the sets with images repeated."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from busdiff.evaluate.fidelity import (
    FidelityError,
    _Gram,
    _mmd2_unbiased,
    compare,
    fid,
    floor,
    kid,
    kid_subset_size,
)


def _sets(n_a: int, n_b: int, d: int, shift: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_a, d)).astype(np.float32)
    b = (rng.normal(size=(n_b, d)) * 1.2 + shift).astype(np.float32)
    return a, b


class _Kernels(NamedTuple):
    kaa: np.ndarray
    kbb: np.ndarray
    kab: np.ndarray


def _kernels(a: np.ndarray, b: np.ndarray) -> _Kernels:
    """KID's kernel ``(x·y/d + 1)³`` straight from the features (the code derives it from a Gram matrix)."""
    k = lambda x, y: (x @ y.T / x.shape[1] + 1.0) ** 3  # noqa: E731
    return _Kernels(k(a, a), k(b, b), k(a, b))


def _torch_fidelity_fid(a: np.ndarray, b: np.ndarray) -> float:
    sa = fid_features_to_statistics(torch.from_numpy(a))
    sb = fid_features_to_statistics(torch.from_numpy(b))
    return fid_statistics_to_metric(sa, sb, False)["frechet_inception_distance"]


@pytest.mark.parametrize(("n_a", "n_b", "d"), [(60, 40, 200), (300, 260, 64)])
def test_fid_equals_torch_fidelity(n_a, n_b, d):
    # Both routes: fewer images than dimensions (SVD of A Bᵀ) and more (d×d eigen-decomposition).
    a, b = _sets(n_a, n_b, d)
    assert fid(a, b) == pytest.approx(_torch_fidelity_fid(a, b), rel=1e-6)


def test_kid_equals_torch_fidelity_with_the_same_seed():
    a, b = _sets(70, 45, 128)
    ours = kid(a, b, subset_size=30, subsets=40, seed=7)
    ref = kid_features_to_metric(
        torch.from_numpy(a),
        torch.from_numpy(b),
        kid_subset_size=30,
        kid_subsets=40,
        rng_seed=7,
        verbose=False,
    )
    assert ours["mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-5)
    assert ours["std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-5)


def test_a_set_against_itself_is_zero_and_a_shift_is_not():
    a, b = _sets(50, 50, 64)
    assert abs(fid(a, a)) < 1e-6
    assert fid(a, b) > 10
    # KID is unbiased: two samples of one distribution average ~0, a shifted one does not.
    same = np.random.default_rng(5).normal(size=(50, 64))
    assert abs(kid(a, same, subset_size=25, subsets=50)["mean"]) < 0.05
    assert kid(a, b, subset_size=25, subsets=50)["mean"] > 0.2


def test_kid_subset_size_follows_the_set_sizes():
    assert kid_subset_size(546, 116) == 116
    assert kid_subset_size(5000, 3000) == 1000  # torch-fidelity's default when both sets are large
    assert kid_subset_size(40, 12, requested=50) == 12  # a request larger than a set is capped
    a, b = _sets(30, 12, 32)
    assert kid(a, b)["subset_size"] == 12
    with pytest.raises(FidelityError, match="at least 2"):
        kid_subset_size(1, 40)


def test_too_small_sets_fail_with_the_set_named():
    a, b = _sets(1, 10, 16)
    with pytest.raises(FidelityError, match="set A: 1 image"):
        fid(a, b)
    with pytest.raises(FidelityError, match="dimensions differ"):
        fid(np.zeros((4, 8)), np.zeros((4, 9)))


def test_compare_intervals_are_the_replicates_percentiles_reproducibly():
    a, b = _sets(80, 40, 64)
    r1 = compare(a, b, bootstrap=100, seed=3)
    assert r1 == compare(a, b, bootstrap=100, seed=3)
    assert r1["fid"] == pytest.approx(fid(a, b))
    # Replicates repeat images, which raises FID: its interval is where the replicates fall, above the
    # full-set figure by about the shift, not recentred on it.
    shift = r1["bootstrap_shift"]["fid"]
    assert shift > 0
    lo, hi = r1["fid_ci"]
    assert lo < r1["fid"] + shift < hi
    assert abs((lo + hi) / 2 - r1["fid"] - shift) < abs((lo + hi) / 2 - r1["fid"])  # not recentred
    # KID's replicates leave out pairs of an image with its own copies: no such shift.
    klo, khi = r1["kid_ci"]
    assert klo < r1["kid"] < khi
    assert abs(r1["bootstrap_shift"]["kid"]) < 0.2 * (khi - klo)
    none = compare(a, b, bootstrap=0)
    assert none["fid_ci"] is None and none["kid_ci"] is None and "bootstrap_shift" not in none


def test_floor_matches_the_sample_size_and_says_when_it_cannot():
    rng = np.random.default_rng(1)
    pool, held = rng.normal(size=(60, 32)), rng.normal(size=(20, 32))
    small = floor(pool, held, 10, draws=5, kid_subset=None)
    assert small["matched"] and small["n_pool_used"] == 10 and small["draws"] == 5
    assert small["fid_std"] > 0 and 0 < small["precision"] <= 1
    big = floor(pool, held, 200)
    assert not big["matched"] and big["n_pool_used"] == 60 and big["draws"] == 1 and big["fid_std"] == 0
    # FID shrinks with sample size even between samples of one distribution: why floors are matched.
    assert small["fid"] > big["fid"]
    # nearest_k=5 needs 6 images per set: a floor of 5 says why it has no precision/recall
    tiny = floor(pool, held, 5)
    assert tiny["precision"] is None and "real train (floor) 5" in tiny["prdc_skipped"]


def test_weighted_draws_equal_the_repeated_sets():
    # Bootstrap replicates and floors work on multiplicities; the figures must equal those of the sets
    # with the images actually repeated.
    a, b = _sets(40, 30, 64)
    g = _Gram({"a": a, "b": b})
    rng = np.random.default_rng(2)
    ia, ib = rng.integers(0, 40, 40), rng.integers(0, 30, 30)
    wa, wb = np.bincount(ia, minlength=40), np.bincount(ib, minlength=30)
    da, db = np.flatnonzero(wa), np.flatnonzero(wb)
    xa = g.weighted(g.block["a"], da, wa[da].astype(float))
    xb = g.weighted(g.block["b"], 40 + db, wb[db].astype(float))
    assert g.fid(xa, xb) == pytest.approx(fid(a[ia], b[ib]), rel=1e-7)
    # KID: the U-statistic over pairs of positions holding different images (a copy is never paired with
    # itself), written out position by position
    k = _kernels(a[ia].astype(np.float64), b[ib].astype(np.float64))

    def within(kk, idx):
        differ = idx[:, None] != idx[None, :]
        return kk[differ].mean()

    u_stat = within(k.kaa, ia) + within(k.kbb, ib) - 2 * k.kab.mean()
    assert g.kid(xa, xb) == pytest.approx(u_stat, rel=1e-9)
    # with every image once and equal sizes this is the estimator torch-fidelity applies to each subset
    g30 = _Gram({"a": a[:30], "b": b})
    k = _kernels(a[:30].astype(np.float64), b.astype(np.float64))
    ones = g30.kid(g30.weighted(g30.block["a"]), g30.weighted(g30.block["b"]))
    assert ones == pytest.approx(_mmd2_unbiased(k.kaa, k.kbb, k.kab), rel=1e-9)

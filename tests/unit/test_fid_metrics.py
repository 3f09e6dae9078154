"""FID/KID from features: equal to torch-fidelity's own estimators, subset sizes, intervals, floors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from busdiff.evaluate.fidelity import (
    FidelityError,
    _kernels,
    _mmd2_unbiased,
    _Resampler,
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


def test_compare_gives_intervals_around_the_estimate_reproducibly():
    a, b = _sets(80, 40, 64)
    r1 = compare(a, b, bootstrap=60, seed=3)
    r2 = compare(a, b, bootstrap=60, seed=3)
    assert r1 == r2
    assert r1["fid"] == pytest.approx(fid(a, b))
    lo, hi = r1["fid_ci"]
    assert lo < r1["fid"] < hi
    klo, khi = r1["kid_ci"]
    assert klo < r1["kid"] < khi
    # Resampling with replacement repeats images, which raises FID: the recentring removes that bias.
    assert r1["bootstrap_bias"]["fid"] > 0
    assert compare(a, b, bootstrap=0)["fid_ci"] is None


def test_floor_matches_the_sample_size_and_says_when_it_cannot():
    rng = np.random.default_rng(1)
    pool, held = rng.normal(size=(60, 32)), rng.normal(size=(20, 32))
    small = floor(pool, held, 10, draws=5, kid_subset=None)
    assert small["matched"] and small["n_pool_used"] == 10 and small["draws"] == 5
    assert small["fid_range"][0] <= small["fid"] <= small["fid_range"][1]
    big = floor(pool, held, 200)
    assert not big["matched"] and big["n_pool_used"] == 60 and big["draws"] == 1
    # FID shrinks with sample size even between samples of one distribution: why floors are matched.
    assert small["fid"] > big["fid"]


def test_resamples_by_multiplicity_equal_the_repeated_sets():
    # Bootstrap intervals and floors work on multiplicities; the figures must equal those of the sets
    # with the images actually repeated.
    a, b = _sets(40, 30, 64)
    rng = np.random.default_rng(2)
    ia, ib = rng.integers(0, 40, 40), rng.integers(0, 30, 30)
    res = _Resampler(a.astype(np.float64), b.astype(np.float64))
    wa, wb = np.bincount(ia, minlength=40).astype(float), np.bincount(ib, minlength=30).astype(float)
    assert res.fid(wa, wb) == pytest.approx(fid(a[ia], b[ib]), rel=1e-7)
    k = _kernels(a[ia].astype(np.float64), b[ib].astype(np.float64))
    n, m = len(ia), len(ib)
    u_stat = (
        (k.kaa.sum() - np.trace(k.kaa)) / (n * (n - 1))
        + (k.kbb.sum() - np.trace(k.kbb)) / (m * m - m)
        - 2 * k.kab.mean()
    )
    assert res.kid(wa, wb) == pytest.approx(u_stat, rel=1e-9)
    # with equal sizes this is the estimator torch-fidelity applies to each KID subset
    eq = _Resampler(a[:30].astype(np.float64), b.astype(np.float64))
    k = _kernels(a[:30].astype(np.float64), b.astype(np.float64))
    assert eq.kid(np.ones(30), np.ones(30)) == pytest.approx(_mmd2_unbiased(k.kaa, k.kbb, k.kab), rel=1e-9)

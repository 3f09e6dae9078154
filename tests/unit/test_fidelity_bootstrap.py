"""The paired bootstrap of synthetic vs its real-vs-real floor: its intervals mean what they say."""

from __future__ import annotations

import numpy as np
import pytest

from busdiff.evaluate.fidelity import fid, fidelity_row

FAST = {"kid_subsets": 20, "floor_draws": 5}


def _gauss(rng: np.random.Generator, n: int, d: int = 32, shift: float = 0.0) -> np.ndarray:
    return rng.normal(size=(n, d)) + shift


def _width(ci: list[float]) -> float:
    return ci[1] - ci[0]


def test_two_draws_of_one_distribution_are_not_told_apart():
    # Synthetic, real train and held-out real all from one Gaussian: the 95% intervals of the differences
    # should cover 0 in about 95% of repetitions (the floor's own draw makes them somewhat conservative).
    covered = {"fid": 0, "kid": 0}
    for seed in range(20):
        rng = np.random.default_rng(seed)
        vs = fidelity_row(
            _gauss(rng, 40), _gauss(rng, 30), _gauss(rng, 80), bootstrap=200, seed=seed, **FAST
        )["vs_floor"]
        for key in covered:
            lo, hi = vs[f"{key}_diff_ci"]
            covered[key] += lo <= 0 <= hi
    assert covered["fid"] >= 17 and covered["kid"] >= 17


def test_a_shifted_synthetic_set_is_worse_than_the_floor_and_a_copy_better():
    rng = np.random.default_rng(0)
    syn, held, pool = _gauss(rng, 40, shift=1.0), _gauss(rng, 40), _gauss(rng, 80)
    row = fidelity_row(syn, held, pool, bootstrap=200, **FAST)
    vs = row["vs_floor"]
    assert vs["fid_diff_ci"][0] > 0 and vs["kid_diff_ci"][0] > 0
    assert vs["p_synthetic_better"] == {"fid": 0.0, "kid": 0.0}
    assert vs["fid_diff"] == pytest.approx(row["synthetic_vs_held_out"]["fid"] - row["floor"]["fid"])
    assert vs["fid_diff_ci"][0] < vs["fid_diff"] < vs["fid_diff_ci"][1]
    # the held-out images themselves (memorised): closer than any real sample of that size
    copy = fidelity_row(held.copy(), held, pool, bootstrap=200, **FAST)["vs_floor"]
    assert copy["fid_diff_ci"][1] < 0 and copy["kid_diff_ci"][1] < 0
    assert copy["p_synthetic_better"]["fid"] > 0.95 and copy["p_synthetic_better"]["kid"] > 0.95


def test_the_held_out_draw_is_shared_by_synthetic_and_floor():
    # With few held-out images their draw dominates each figure's spread; paired, it cancels in the
    # difference (unpaired, the difference would spread by about sqrt(2) times either figure).
    rng = np.random.default_rng(1)
    row = fidelity_row(_gauss(rng, 80, 16), _gauss(rng, 12, 16), _gauss(rng, 160, 16), bootstrap=300, **FAST)
    syn, fl, vs = row["synthetic_vs_held_out"], row["floor"], row["vs_floor"]
    assert _width(vs["fid_diff_ci"]) < 0.8 * min(_width(syn["fid_ci"]), _width(fl["fid_ci"]))
    assert _width(vs["kid_diff_ci"]) < 0.8 * min(_width(syn["kid_ci"]), _width(fl["kid_ci"]))


def test_the_floor_interval_redraws_the_held_out_side_and_point_estimates_use_full_sets():
    rng = np.random.default_rng(2)
    syn, held, pool = _gauss(rng, 30), _gauss(rng, 25), _gauss(rng, 30)  # the pool is the floor's one draw
    row = fidelity_row(syn, held, pool, bootstrap=100, **FAST)
    s, fl = row["synthetic_vs_held_out"], row["floor"]
    assert fl["draws"] == 1 and fl["fid"] == pytest.approx(fid(pool, held))
    assert _width(fl["fid_ci"]) > 0 and _width(fl["kid_ci"]) > 0
    assert s["fid"] == pytest.approx(fid(syn, held))
    # resampling repeats images, so FID's replicates sit above the full-set figures, on both sides alike
    assert s["bootstrap_shift"]["fid"] > 0 and fl["bootstrap_shift"]["fid"] > 0
    assert fidelity_row(syn, held, pool, bootstrap=100, **FAST) == row  # seeded


def test_no_bootstrap_and_an_unmatched_floor_are_said():
    rng = np.random.default_rng(3)
    row = fidelity_row(_gauss(rng, 50), _gauss(rng, 20), _gauss(rng, 30), bootstrap=0, **FAST)
    vs, fl = row["vs_floor"], row["floor"]
    assert vs["fid_diff_ci"] is None and vs["p_synthetic_better"] is None and fl["fid_ci"] is None
    assert not vs["matched"] and not fl["matched"] and fl["n_pool_used"] == 30

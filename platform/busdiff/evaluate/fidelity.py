"""FID and KID from cached features, with bootstrap intervals and the real-vs-real floor.

The estimators are torch-fidelity's (FID: Fréchet distance of Gaussians fitted to the 2048-d features;
KID: unbiased MMD² with the cubic polynomial kernel ``(x·y/d + 1)³`` averaged over random subsets), computed
here from feature matrices so that per-class figures, bootstrap resamples and floors all reuse one pass of
the network. ``tests/unit/test_fid_metrics.py`` checks both against torch-fidelity's own functions.

FID's matrix square root is computed exactly without a d×d eigen-decomposition: with centred features
A (n1×d) and B (n2×d), ``tr sqrt(Σ1 Σ2)`` equals the sum of singular values of ``A Bᵀ`` divided by
``sqrt((n1-1)(n2-1))`` (``Σ1 Σ2`` and ``A Bᵀ B Aᵀ`` share their non-zero eigenvalues), an n1×n2 problem:
milliseconds for the few hundred images BUSI has, so hundreds of bootstrap resamples are cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KID_DEFAULT_MAX_SUBSET = 1000  # torch-fidelity's default subset size


class FidelityError(ValueError):
    """A set is too small (or empty) to compute a metric; the message names the set."""


def _check(x: np.ndarray, name: str, minimum: int = 2) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise FidelityError(f"{name}: expected a (n, d) feature matrix, got shape {x.shape}")
    if len(x) < minimum:
        raise FidelityError(f"{name}: {len(x)} image(s); FID/KID need at least {minimum} per set")
    return x


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet Inception Distance between feature sets ``a`` (n1×d) and ``b`` (n2×d); n1, n2 >= 2."""
    a, b = _check(a, "set A"), _check(b, "set B")
    if a.shape[1] != b.shape[1]:
        raise FidelityError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    na, nb = len(a) - 1, len(b) - 1
    tr_a = float((ca * ca).sum()) / na
    tr_b = float((cb * cb).sum()) / nb
    if min(len(a), len(b)) <= a.shape[1]:
        sv = np.linalg.svd(ca @ cb.T, compute_uv=False)
        tr_sqrt = float(sv.sum()) / np.sqrt(na * nb)
    else:  # more images than dimensions: the d×d route is the smaller problem
        sa, sb = ca.T @ ca / na, cb.T @ cb / nb
        w, v = np.linalg.eigh(sa)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        ev = np.linalg.eigvalsh(root_a @ sb @ root_a)
        tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + tr_a + tr_b - 2 * tr_sqrt)


def kid_subset_size(n_a: int, n_b: int, requested: int | None = None) -> int:
    """The KID subset size: ``requested`` (default 1000, torch-fidelity's) capped by the smaller set."""
    size = min(KID_DEFAULT_MAX_SUBSET if requested is None else int(requested), n_a, n_b)
    if size < 2:
        raise FidelityError(f"KID needs at least 2 images per set (sets of {n_a} and {n_b})")
    return size


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m = kxx.shape[0]
    sxx = kxx.sum() - np.trace(kxx)
    syy = kyy.sum() - np.trace(kyy)
    return float((sxx + syy) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


@dataclass
class _Kernels:
    kaa: np.ndarray
    kbb: np.ndarray
    kab: np.ndarray


def _kernels(a: np.ndarray, b: np.ndarray) -> _Kernels:
    return _Kernels(_poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b))


def _kid_from_kernels(
    k: _Kernels, ia: np.ndarray, ib: np.ndarray, subset: int, subsets: int, rng: np.random.RandomState
) -> np.ndarray:
    """MMD² of ``subsets`` random subsets; ``ia``/``ib`` index the sets (a bootstrap resample or all)."""
    out = np.empty(subsets)
    for s in range(subsets):
        # Same draw order as torch-fidelity (set 1, then set 2, per subset).
        xa = ia[rng.choice(len(ia), subset, replace=False)]
        xb = ib[rng.choice(len(ib), subset, replace=False)]
        out[s] = _mmd2_unbiased(k.kaa[np.ix_(xa, xa)], k.kbb[np.ix_(xb, xb)], k.kab[np.ix_(xa, xb)])
    return out


def kid(
    a: np.ndarray, b: np.ndarray, subset_size: int | None = None, subsets: int = 100, seed: int = 2020
) -> dict[str, float]:
    """Kernel Inception Distance: ``{"mean", "std", "subset_size"}``; the subset size is capped by the
    smaller set (see :func:`kid_subset_size`). Seed 2020 is torch-fidelity's default."""
    a, b = _check(a, "set A"), _check(b, "set B")
    m = kid_subset_size(len(a), len(b), subset_size)
    vals = _kid_from_kernels(
        _kernels(a, b), np.arange(len(a)), np.arange(len(b)), m, subsets, np.random.RandomState(seed)
    )
    return {"mean": float(vals.mean()), "std": float(vals.std()), "subset_size": m}


def _interval(values: np.ndarray, ci: float, centre: float | None = None) -> list[float]:
    """Percentile interval of ``values``; with ``centre``, shifted so the resamples' mean sits on it."""
    lo, hi = np.percentile(values, [50 * (1 - ci), 50 * (1 + ci)])
    shift = 0.0 if centre is None else float(values.mean()) - centre
    return [float(lo) - shift, float(hi) - shift]


class _Resampler:
    """FID and KID of weighted subsets of two fixed feature sets, without touching the d-dim features again.

    A resample (bootstrap with replacement, or a subset without) is a vector of multiplicities per image.
    Everything is precomputed once: cross products ``A Bᵀ``, squared norms, and the KID kernels. Per
    resample: FID's cross term is the nuclear norm of the centred cross-product matrix over the distinct
    images, each row/column scaled by sqrt(multiplicity) (the same singular values as the matrix with the
    repeated rows), through ``eigvalsh`` of its Gram matrix; KID is the unbiased MMD² U-statistic over the
    whole resample (repeated images count as distinct positions), from kernel sums."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a, self.b = a, b
        self.ab = a @ b.T
        self.sq_a, self.sq_b = (a * a).sum(1), (b * b).sum(1)
        self.k = _kernels(a, b)
        self.diag_a, self.diag_b = np.diag(self.k.kaa).copy(), np.diag(self.k.kbb).copy()

    def fid(self, wa: np.ndarray, wb: np.ndarray) -> float:
        na, nb = wa.sum(), wb.sum()
        ua, ub = np.flatnonzero(wa), np.flatnonzero(wb)
        mu_a = wa[ua] @ self.a[ua] / na
        mu_b = wb[ub] @ self.b[ub] / nb
        tr_a = (wa[ua] @ self.sq_a[ua] - na * mu_a @ mu_a) / (na - 1)
        tr_b = (wb[ub] @ self.sq_b[ub] - nb * mu_b @ mu_b) / (nb - 1)
        # (x - mu_a)·(y - mu_b) for the distinct images x of the A resample, y of the B resample
        m = (
            self.ab[np.ix_(ua, ub)]
            - (self.a[ua] @ mu_b)[:, None]
            - (self.b[ub] @ mu_a)[None, :]
            + mu_a @ mu_b
        )
        m *= np.sqrt(wa[ua])[:, None] * np.sqrt(wb[ub])[None, :]
        gram = m @ m.T if len(ua) <= len(ub) else m.T @ m
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum() / np.sqrt((na - 1) * (nb - 1))
        diff = mu_a - mu_b
        return float(diff @ diff + tr_a + tr_b - 2 * tr_sqrt)

    def kid(self, wa: np.ndarray, wb: np.ndarray) -> float:
        na, nb = wa.sum(), wb.sum()
        # position pairs p != q: all pairs (w wᵀ) minus the pairs of a position with itself (w)
        sxx = wa @ self.k.kaa @ wa - wa @ self.diag_a
        syy = wb @ self.k.kbb @ wb - wb @ self.diag_b
        return float(sxx / (na * (na - 1)) + syy / (nb * (nb - 1)) - 2 * (wa @ self.k.kab @ wb) / (na * nb))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(idx, minlength=n).astype(np.float64)


def compare(
    a: np.ndarray,
    b: np.ndarray,
    *,
    kid_subset: int | None = None,
    kid_subsets: int = 100,
    bootstrap: int = 200,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """FID and KID of ``a`` vs ``b`` with bootstrap intervals (both sets resampled with replacement
    ``bootstrap`` times; 0 skips them). Plain JSON types only.

    A resample repeats some images and leaves others out, which by itself raises FID (fewer distinct
    images: on busi-256 train vs test, 78 -> 102 on average). The percentile interval is therefore
    recentred on the point estimate: it gives the figure's sampling spread, not that resampling bias
    (the real-vs-real floor is what speaks to FID's small-sample bias). KID's resamples use the whole
    resample (the U-statistic) rather than random subsets: the same expectation, far less work."""
    a, b = _check(a, "set A"), _check(b, "set B")
    m = kid_subset_size(len(a), len(b), kid_subset)
    kid_vals = _kid_from_kernels(
        _kernels(a, b),
        np.arange(len(a)),
        np.arange(len(b)),
        m,
        kid_subsets,
        np.random.RandomState(2020 + seed),
    )
    out: dict[str, Any] = {
        "n_a": len(a),
        "n_b": len(b),
        "fid": fid(a, b),
        "kid": float(kid_vals.mean()),
        "kid_std": float(kid_vals.std()),
        "kid_subset_size": m,
        "kid_subsets": kid_subsets,
        "bootstrap": int(bootstrap),
        "ci_level": ci,
        "fid_ci": None,
        "kid_ci": None,
    }
    if bootstrap > 0:
        res = _Resampler(a, b)
        rng = np.random.RandomState(seed)
        fids, kids = np.empty(bootstrap), np.empty(bootstrap)
        for i in range(bootstrap):
            wa = _counts(rng.randint(0, len(a), len(a)), len(a))
            wb = _counts(rng.randint(0, len(b), len(b)), len(b))
            fids[i], kids[i] = res.fid(wa, wb), res.kid(wa, wb)
        out["fid_ci"] = _interval(fids, ci, out["fid"])
        out["kid_ci"] = _interval(kids, ci, out["kid"])
        out["bootstrap_bias"] = {
            "fid": float(fids.mean()) - out["fid"],
            "kid": float(kids.mean()) - out["kid"],
        }
    return out


def floor(
    pool: np.ndarray,
    held_out: np.ndarray,
    n: int,
    *,
    draws: int = 10,
    kid_subset: int | None = None,
    kid_subsets: int = 100,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """The real-vs-real floor at a matched sample size: ``n`` images drawn without replacement from the
    real ``pool`` (e.g. the train split) against ``held_out``, ``draws`` times; mean and spread of FID/KID.

    ``n`` larger than the pool uses the whole pool once and says ``matched: false``. KID here is the
    unbiased MMD² over the whole draw (same expectation as the subset average; ``kid_subset`` and
    ``kid_subsets`` are accepted for symmetry with :func:`compare` and recorded)."""
    pool, held_out = _check(pool, "real pool"), _check(held_out, "held-out set")
    n_used = min(int(n), len(pool))
    if n_used < 2:
        raise FidelityError(f"floor: {n} image(s) to match; need at least 2")
    matched = n_used == int(n)
    draws = draws if n_used < len(pool) else 1
    res = _Resampler(pool, held_out)
    rng = np.random.RandomState(seed)
    wb = np.ones(len(held_out))
    fids, kids = np.empty(draws), np.empty(draws)
    for i in range(draws):
        wa = _counts(rng.choice(len(pool), n_used, replace=False), len(pool))
        fids[i], kids[i] = res.fid(wa, wb), res.kid(wa, wb)
    return {
        "n_pool_used": n_used,
        "n_requested": int(n),
        "n_held_out": len(held_out),
        "matched": matched,
        "draws": draws,
        "fid": float(fids.mean()),
        "fid_std": float(fids.std()),
        "fid_range": _interval(fids, ci) if draws > 1 else [float(fids[0])] * 2,
        "kid": float(kids.mean()),
        "kid_std": float(kids.std()),
        "kid_range": _interval(kids, ci) if draws > 1 else [float(kids[0])] * 2,
        "kid_subset_size": kid_subset_size(n_used, len(held_out), kid_subset),
    }

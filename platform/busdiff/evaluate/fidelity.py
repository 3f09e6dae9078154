"""FID, KID, precision/recall/density/coverage from cached features, with the real-vs-real floor and a
paired bootstrap.

The estimators are torch-fidelity's (FID: Fréchet distance of Gaussians fitted to the 2048-d features;
KID: unbiased MMD² with the cubic polynomial kernel ``(x·y/d + 1)³`` averaged over random subsets) and
Naeem et al.'s (:mod:`busdiff.evaluate.prdc`), computed here from feature matrices so that per-class
figures, bootstrap replicates and floors all reuse one pass of the network. ``tests/unit/test_fid_metrics.py``
checks them against torch-fidelity's own functions.

Everything past the point estimates works on one Gram matrix of the images involved (:class:`_Gram`): FID's
means, traces and ``tr sqrt(Σ1 Σ2)``, KID's kernel and the nearest-neighbour distances all follow from inner
products. ``tr sqrt(Σ1 Σ2)`` is the sum of singular values of the centred cross-product matrix ``A Bᵀ`` over
``sqrt((n1-1)(n2-1))`` (``Σ1 Σ2`` and ``A Bᵀ B Aᵀ`` share their non-zero eigenvalues): an n1×n2 problem, not
a 2048×2048 matrix square root, so hundreds of replicates take seconds for the few hundred images BUSI has.

Paired bootstrap (:func:`fidelity_row`). Replicate b redraws the held-out real set H with replacement once
(H_b), the synthetic set S with replacement (S_b), and for the floor a fresh set of |S| real training images
resampled the same way (T_b: |S| drawn without replacement from the pool, then |S| with replacement from
those), and computes FID/KID(S_b, H_b) and FID/KID(T_b, H_b). Repeated images raise FID in every replicate
(on busi-256 train vs test 78 -> about 100); S_b and T_b repeat images alike, so that shift and the luck of
the held-out draw cancel in the difference, whose percentile interval is the comparison to read. The
interval of each figure alone is the plain percentile interval of its replicates (FID's sits above the
full-set figure by that shift; KID's replicates leave out pairs of an image with a copy of itself and are
not shifted). Point estimates are always those of the full sets; the floor's is the mean over
``floor_draws`` random training subsets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, ParamSpec, TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from busdiff.evaluate.prdc import METRICS, NEAREST_K, prdc_from_distances, too_small

KID_DEFAULT_MAX_SUBSET = 1000  # torch-fidelity's default subset size
DEFAULT_BOOTSTRAP = 1000  # 15-23 s for 3 classes of 150 vs 120 images (pool 300) + all, 2 busy CPU cores
P = ParamSpec("P")
R = TypeVar("R")


class FidelityError(ValueError):
    """A set is too small (or empty) to compute a metric; the message names the set."""


def _one_blas_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with BLAS/LAPACK on one thread: the many small eigen-decompositions run several times
    faster so (measured: tens of times on a loaded 2-core machine), the one large Gram product about as
    fast."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


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


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m = kxx.shape[0]
    sxx = kxx.sum() - np.trace(kxx)
    syy = kyy.sum() - np.trace(kyy)
    return float((sxx + syy) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


class _Weighted(NamedTuple):
    """Images of one set of a :class:`_Gram` with multiplicities, and their within-set terms."""

    block: slice  # the set's rows in the Gram matrix
    wf: np.ndarray  # multiplicity of each image of the set (0: not drawn), float
    idx: np.ndarray  # the drawn images (Gram indices)
    n: float  # images in all, repeats included
    mu2: float  # |mean - centre|²
    trace: float  # trace of the covariance (denominator n - 1)
    kxx: float  # KID's within-set term over pairs of distinct images; nan with fewer than 2


class _Gram:
    """Inner products of every image of several named feature sets, from which FID, KID and distances of
    any weighted selection follow without touching the d-dim features again. Features are centred on their
    common mean first (FID and distances do not move; KID's kernel uses the uncentred products). Each set
    is a contiguous block (``block``), so within-set sums are products with views, not gathered copies."""

    def __init__(self, sets: dict[str, np.ndarray]) -> None:
        z = np.concatenate([np.asarray(x, np.float64) for x in sets.values()])
        ends = np.cumsum([len(x) for x in sets.values()])
        self.block = {name: slice(e - len(x), e) for (name, x), e in zip(sets.items(), ends, strict=True)}
        centre = z.mean(0)
        zc = z - centre
        self.g = zc @ zc.T
        self.sq = np.diag(self.g).copy()
        proj = zc @ centre
        raw = self.g + proj[:, None] + proj[None, :] + centre @ centre
        self.k = (raw / z.shape[1] + 1.0) ** 3
        self.kdiag = np.diag(self.k).copy()

    def weighted(self, block: slice, idx: np.ndarray | None = None, w: np.ndarray | None = None) -> _Weighted:
        """Images ``idx`` of ``block`` (default: all) drawn ``w`` times each (default: once)."""
        idx = np.arange(block.start, block.stop) if idx is None else idx
        wf = np.zeros(block.stop - block.start)
        wf[idx - block.start] = 1.0 if w is None else w
        n = float(wf.sum())
        mu2 = float(wf @ self.g[block, block] @ wf) / n**2
        pairs = n * n - float(wf @ wf)  # ordered pairs of positions holding different images
        kk = float(wf @ self.k[block, block] @ wf - wf @ (wf * self.kdiag[block]))
        trace = (float(wf @ self.sq[block]) - n * mu2) / (n - 1)
        return _Weighted(block, wf, idx, n, mu2, trace, kk / pairs if pairs else np.nan)

    def fid(self, a: _Weighted, b: _Weighted) -> float:
        x_mub = (self.g[a.block, b.block] @ b.wf)[a.idx - a.block.start] / b.n  # (x - c)·(mu_b - c)
        mua_y = (a.wf @ self.g[a.block, b.block])[b.idx - b.block.start] / a.n
        mua_mub = float(a.wf[a.idx - a.block.start] @ x_mub) / a.n
        # (x - mu_a)·(y - mu_b) over the drawn images, rows and columns scaled by sqrt(multiplicity): the
        # singular values of the centred cross products with the repeated images written out
        m = self.g[np.ix_(a.idx, b.idx)] - x_mub[:, None] - mua_y[None, :] + mua_mub
        m *= np.sqrt(a.wf[a.idx - a.block.start])[:, None] * np.sqrt(b.wf[b.idx - b.block.start])[None, :]
        gram = m @ m.T if len(a.idx) <= len(b.idx) else m.T @ m
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum() / np.sqrt((a.n - 1) * (b.n - 1))
        return float(a.mu2 + b.mu2 - 2 * mua_mub + a.trace + b.trace - 2 * tr_sqrt)

    def kid(self, a: _Weighted, b: _Weighted) -> float:
        """The unbiased MMD² U-statistic over pairs of distinct images (repeats weighted, never paired with
        themselves: with copies paired, a resample's within-set term would rise by about k(x,x)/n)."""
        return a.kxx + b.kxx - 2 * float(a.wf @ self.k[a.block, b.block] @ b.wf) / (a.n * b.n)

    def distances(self, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
        d2 = self.sq[ia][:, None] + self.sq[ib][None, :] - 2 * self.g[np.ix_(ia, ib)]
        return np.sqrt(np.clip(d2, 0, None))

    def prdc(self, real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
        return prdc_from_distances(
            self.distances(real, real), self.distances(fake, fake), self.distances(real, fake), k
        )


def _subset_kid(
    k: np.ndarray, ia: np.ndarray, ib: np.ndarray, subset: int, subsets: int, rng: np.random.RandomState
) -> np.ndarray:
    """torch-fidelity's KID: MMD² of ``subsets`` random subsets of ``ia`` and ``ib`` (indices into ``k``)."""
    out = np.empty(subsets)
    for s in range(subsets):
        # Same draw order as torch-fidelity (set 1, then set 2, per subset).
        xa = ia[rng.choice(len(ia), subset, replace=False)]
        xb = ib[rng.choice(len(ib), subset, replace=False)]
        out[s] = _mmd2_unbiased(k[np.ix_(xa, xa)], k[np.ix_(xb, xb)], k[np.ix_(xa, xb)])
    return out


@_one_blas_thread
def kid(
    a: np.ndarray, b: np.ndarray, subset_size: int | None = None, subsets: int = 100, seed: int = 2020
) -> dict[str, float]:
    """Kernel Inception Distance: ``{"mean", "std", "subset_size"}``; the subset size is capped by the
    smaller set (see :func:`kid_subset_size`). Seed 2020 is torch-fidelity's default."""
    a, b = _check(a, "set A"), _check(b, "set B")
    m = kid_subset_size(len(a), len(b), subset_size)
    g = _Gram({"a": a, "b": b})
    vals = _subset_kid(g.k, _ids(g.block["a"]), _ids(g.block["b"]), m, subsets, np.random.RandomState(seed))
    return {"mean": float(vals.mean()), "std": float(vals.std()), "subset_size": m}


def _interval(values: np.ndarray, ci: float) -> list[float] | None:
    """The central ``ci`` percentile interval of the replicates that are defined (KID needs 2 distinct
    images per set), or None."""
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi = np.percentile(values, [50 * (1 - ci), 50 * (1 + ci)])
    return [float(lo), float(hi)]


def _ids(block: slice) -> np.ndarray:
    return np.arange(block.start, block.stop)


def _draw(g: _Gram, block: slice, n: int, rng: np.random.Generator) -> _Weighted:
    """``n`` images of ``block``: without replacement when fewer than all, then ``n`` with replacement from
    those (a bootstrap resample of a random ``n``-subset)."""
    idx = _ids(block)
    if n < len(idx):
        idx = rng.choice(idx, n, replace=False)
    counts = np.bincount(rng.integers(0, len(idx), n), minlength=len(idx))
    nz = np.flatnonzero(counts)
    return g.weighted(block, idx[nz], counts[nz].astype(np.float64))


def _replicates(
    g: _Gram, held: slice, sides: list[tuple[slice, int]], reps: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """FID and KID ``(reps, len(sides))`` of each side ``(set, n)`` against the held-out set; every
    replicate resamples ``held`` once and compares each side, resampled by :func:`_draw`, with that draw."""
    rng = np.random.default_rng(seed)
    fids, kids = np.empty((reps, len(sides))), np.empty((reps, len(sides)))
    for r in range(reps):
        h = _draw(g, held, held.stop - held.start, rng)
        for s, (block, n) in enumerate(sides):
            x = _draw(g, block, n, rng)
            fids[r, s], kids[r, s] = g.fid(x, h), g.kid(x, h)
    return fids, kids


def _add_intervals(side: dict[str, Any], fids: np.ndarray, kids: np.ndarray, ci: float) -> None:
    """``fid_ci``/``kid_ci`` from one side's replicates, and ``bootstrap_shift``: their mean minus the
    full-set figure."""
    side.update(fid_ci=_interval(fids, ci), kid_ci=_interval(kids, ci), bootstrap_shift={})
    for key, v in (("fid", fids), ("kid", kids)):
        ok = v[np.isfinite(v)]
        side["bootstrap_shift"][key] = float(ok.mean()) - side[key] if len(ok) else None


def _synthetic_side(
    g: _Gram, a: slice, b: slice, kid_subset: int | None, kid_subsets: int, seed: int
) -> dict[str, Any]:
    """Point estimates of set ``a`` vs ``b``: FID, and KID as torch-fidelity's subset average."""
    ia, ib = _ids(a), _ids(b)
    m = kid_subset_size(len(ia), len(ib), kid_subset)
    kids = _subset_kid(g.k, ia, ib, m, kid_subsets, np.random.RandomState(2020 + seed))
    return {
        "n_a": len(ia),
        "n_b": len(ib),
        "fid": g.fid(g.weighted(a), g.weighted(b)),
        "kid": float(kids.mean()),
        "kid_std": float(kids.std()),
        "kid_subset_size": m,
        "kid_subsets": kid_subsets,
        "fid_ci": None,
        "kid_ci": None,
    }


@_one_blas_thread
def compare(
    a: np.ndarray,
    b: np.ndarray,
    *,
    kid_subset: int | None = None,
    kid_subsets: int = 100,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """FID and KID of ``a`` vs ``b`` with percentile intervals over ``bootstrap`` replicates resampling
    both sets (0 skips them); ``bootstrap_shift`` is the replicates' mean minus the full-set figure (see
    the module docstring: FID's intervals sit above the estimate). Plain JSON types only."""
    a, b = _check(a, "set A"), _check(b, "set B")
    g = _Gram({"a": a, "b": b})
    out = _synthetic_side(g, g.block["a"], g.block["b"], kid_subset, kid_subsets, seed)
    out.update(bootstrap=int(bootstrap), ci_level=ci)
    if bootstrap > 0:
        fids, kids = _replicates(g, g.block["b"], [(g.block["a"], len(a))], bootstrap, seed)
        _add_intervals(out, fids[:, 0], kids[:, 0], ci)
    return out


def _floor_side(
    g: _Gram,
    pool: slice,
    held: slice,
    n: int,
    draws: int,
    kid_subset: int | None,
    nearest_k: int,
    seed: int,
) -> dict[str, Any]:
    """The real-vs-real floor's point estimates: means over ``draws`` random ``n``-subsets of ``pool``."""
    pool_ids, held_ids = _ids(pool), _ids(held)
    n_used = min(int(n), len(pool_ids))
    if n_used < 2:
        raise FidelityError(f"floor: {n} image(s) to match; need at least 2")
    draws = draws if n_used < len(pool_ids) else 1
    rng = np.random.default_rng(seed)
    h = g.weighted(held)
    skip = too_small({"real train (floor)": n_used, "held-out real": len(held_ids)}, nearest_k)
    vals: dict[str, list[float]] = {k: [] for k in ("fid", "kid", *METRICS)}
    for _ in range(draws):
        sub = np.sort(rng.choice(pool_ids, n_used, replace=False))
        x = g.weighted(pool, sub)
        vals["fid"].append(g.fid(x, h))
        vals["kid"].append(g.kid(x, h))
        if not skip:
            for k, v in g.prdc(held_ids, sub, nearest_k).items():
                vals[k].append(v)
    out: dict[str, Any] = {
        "n_pool_used": n_used,
        "n_requested": int(n),
        "n_held_out": len(held_ids),
        "matched": n_used == int(n),
        "draws": draws,
        "fid": float(np.mean(vals["fid"])),
        "fid_std": float(np.std(vals["fid"])),
        "kid": float(np.mean(vals["kid"])),
        "kid_std": float(np.std(vals["kid"])),
        "kid_subset_size": kid_subset_size(n_used, len(held_ids), kid_subset),
        "fid_ci": None,
        "kid_ci": None,
    }
    out.update({k: float(np.mean(vals[k])) if vals[k] else None for k in METRICS})
    out["prdc_skipped"] = skip
    return out


@_one_blas_thread
def floor(
    pool: np.ndarray,
    held_out: np.ndarray,
    n: int,
    *,
    draws: int = 10,
    kid_subset: int | None = None,
    nearest_k: int = NEAREST_K,
    seed: int = 0,
) -> dict[str, Any]:
    """The real-vs-real floor at a matched sample size: ``n`` images drawn without replacement from the
    real ``pool`` (e.g. the train split) against ``held_out``, ``draws`` times; mean and spread of FID/KID,
    mean precision/recall/density/coverage (``None`` with ``prdc_skipped`` when a set has <= k images).

    ``n`` larger than the pool uses the whole pool once and says ``matched: false``. KID here is the
    unbiased MMD² over the whole draw (same expectation as the subset average; ``kid_subset_size`` is
    recorded for symmetry with :func:`compare`)."""
    pool, held_out = _check(pool, "real pool"), _check(held_out, "held-out set")
    g = _Gram({"pool": pool, "held": held_out})
    return _floor_side(g, g.block["pool"], g.block["held"], n, draws, kid_subset, nearest_k, seed)


@_one_blas_thread
def fidelity_row(
    synthetic: np.ndarray,
    held_out: np.ndarray,
    pool: np.ndarray,
    *,
    nearest_k: int = NEAREST_K,
    kid_subset: int | None = None,
    kid_subsets: int = 100,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    floor_draws: int = 10,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """One row of the fidelity table: synthetic vs held-out real, the real-vs-real floor (``pool`` images
    at the synthetic count vs the same held-out images), and the paired bootstrap of their difference
    (module docstring). ``{"synthetic_vs_held_out", "floor", "vs_floor"}``, plain JSON types."""
    synthetic = _check(synthetic, "synthetic")
    held_out, pool = _check(held_out, "held-out real"), _check(pool, "real train")
    g = _Gram({"synthetic": synthetic, "held": held_out, "pool": pool})
    s, h, p = g.block["synthetic"], g.block["held"], g.block["pool"]
    syn = _synthetic_side(g, s, h, kid_subset, kid_subsets, seed)
    skip = too_small({"synthetic": len(synthetic), "held-out real": len(held_out)}, nearest_k)
    syn.update(dict.fromkeys(METRICS) if skip else g.prdc(_ids(h), _ids(s), nearest_k))
    syn["prdc_skipped"] = skip
    fl = _floor_side(g, p, h, len(synthetic), floor_draws, kid_subset, nearest_k, seed)
    vs: dict[str, Any] = {
        "fid_diff": syn["fid"] - fl["fid"],
        "kid_diff": syn["kid"] - fl["kid"],
        "fid_diff_ci": None,
        "kid_diff_ci": None,
        "p_synthetic_better": None,
        "matched": fl["matched"],
    }
    if bootstrap > 0:
        fids, kids = _replicates(g, h, [(s, len(synthetic)), (p, fl["n_pool_used"])], bootstrap, seed)
        _add_intervals(syn, fids[:, 0], kids[:, 0], ci)
        _add_intervals(fl, fids[:, 1], kids[:, 1], ci)
        better: dict[str, float | None] = {}
        for key, v in (("fid", fids), ("kid", kids)):
            d = v[:, 0] - v[:, 1]
            vs[f"{key}_diff_ci"] = _interval(d, ci)
            d = d[np.isfinite(d)]
            better[key] = float((d < 0).mean() + 0.5 * (d == 0).mean()) if len(d) else None
        vs["p_synthetic_better"] = better
    return {"synthetic_vs_held_out": syn, "floor": fl, "vs_floor": vs}

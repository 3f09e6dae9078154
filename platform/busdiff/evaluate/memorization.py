"""Memorization audit: is any synthetic image a copy of a real training image?

For every synthetic image: its nearest real training image by cosine similarity of the Inception features
(the same cached features FID uses) and the SSIM of the pair (grayscale, both resized to ``ssim_size``).
The same two numbers for every held-out real image against the training images give the baseline: how
close two *different* real scans of this data set are. Synthetic images at or above the near-copy
thresholds are listed for a person to look at.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from busdiff.evaluate.features import ImageItem, read_rgb

_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Structural similarity (Wang et al. 2004: 11-px Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
    8-bit range) of grayscale image pairs ``(N, H, W)`` (or one pair ``(H, W)``), mean over the valid
    window positions; returns ``(N,)`` (or a scalar array)."""
    a_t = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b_t = torch.as_tensor(np.asarray(b, dtype=np.float64))
    single = a_t.dim() == 2
    if single:
        a_t, b_t = a_t[None], b_t[None]
    if a_t.shape != b_t.shape:
        raise ValueError(
            f"SSIM needs images of the same shape, got {tuple(a_t.shape)} and {tuple(b_t.shape)}"
        )
    if min(a_t.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 px, got {tuple(a_t.shape[-2:])}")
    g = _gaussian_window()
    wx, wy = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, wx), wy)

    x, y = a_t[:, None], b_t[:, None]
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + _C1) * (2 * sxy + _C2)) / ((mx * mx + my * my + _C1) * (sxx + syy + _C2))
    out = s.mean(dim=(1, 2, 3)).numpy()
    return out[0] if single else out


def gray(path: str, size: int) -> np.ndarray:
    """A file as a ``(size, size)`` float grayscale array (any mode, any size; bilinear resize)."""
    rgb = Image.fromarray(read_rgb(path)).convert("L")
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)


def nearest(
    queries: np.ndarray, refs: np.ndarray, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Index and cosine similarity of each query's nearest reference feature vector."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    r = refs / np.maximum(np.linalg.norm(refs, axis=1, keepdims=True), 1e-12)
    sims = q @ r.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    idx = sims.argmax(axis=1)
    return idx, sims[np.arange(len(q)), idx]


def _pairs(
    queries: Sequence[ImageItem],
    q_feats: np.ndarray,
    train: Sequence[ImageItem],
    t_feats: np.ndarray,
    size: int,
) -> list[dict[str, Any]]:
    if not len(queries):
        return []
    idx, cos = nearest(q_feats, t_feats)
    cache: dict[str, np.ndarray] = {}

    def img(path: str) -> np.ndarray:
        if path not in cache:
            cache[path] = gray(path, size)
        return cache[path]

    rows = []
    for i, q in enumerate(queries):
        t = train[int(idx[i])]
        rows.append(
            {
                "id": q.id,
                "label": q.label,
                "path": q.path,
                "nearest_id": t.id,
                "nearest_label": t.label,
                "nearest_path": t.path,
                "cosine": float(cos[i]),
                "ssim": float(ssim(img(q.path), img(t.path))),
            }
        )
    return rows


def _summary(values: np.ndarray) -> dict[str, Any]:
    if not len(values):
        return {"n": 0}
    q = np.percentile(values, [5, 50, 95, 99])
    return {
        "n": len(values),
        "mean": float(values.mean()),
        "p5": float(q[0]),
        "median": float(q[1]),
        "p95": float(q[2]),
        "p99": float(q[3]),
        "max": float(values.max()),
    }


def audit(
    synthetic: Sequence[ImageItem],
    syn_feats: np.ndarray,
    train: Sequence[ImageItem],
    train_feats: np.ndarray,
    held_out: Sequence[ImageItem],
    held_feats: np.ndarray,
    *,
    ssim_size: int = 128,
    near_copy_cosine: float = 0.95,
    near_copy_ssim: float = 0.8,
) -> dict[str, Any]:
    """Nearest-training-image audit; plain JSON (``rows`` hold each synthetic image's match)."""
    if not len(train):
        raise ValueError("memorization audit: no real training images to compare with")
    syn = _pairs(synthetic, syn_feats, train, train_feats, ssim_size)
    base = _pairs(held_out, held_feats, train, train_feats, ssim_size)
    s_cos = np.array([r["cosine"] for r in syn])
    s_ssim = np.array([r["ssim"] for r in syn])
    b_cos = np.array([r["cosine"] for r in base])
    b_ssim = np.array([r["ssim"] for r in base])
    near = [r for r in syn if r["cosine"] >= near_copy_cosine or r["ssim"] >= near_copy_ssim]
    near.sort(key=lambda r: (-r["ssim"], -r["cosine"]))
    out = {
        "thresholds": {"cosine": near_copy_cosine, "ssim": near_copy_ssim, "ssim_size": ssim_size},
        "synthetic": {"cosine": _summary(s_cos), "ssim": _summary(s_ssim)},
        "real_baseline": {
            "what": "held-out real vs nearest real training image",
            "cosine": _summary(b_cos),
            "ssim": _summary(b_ssim),
        },
        "n_near_copies": len(near),
        "near_copies": near,
        "rows": syn,
        "baseline_rows": [{k: r[k] for k in ("id", "nearest_id", "cosine", "ssim")} for r in base],
    }
    if len(b_cos) and len(s_cos):
        # The share of synthetic images closer to a training image than 99% of real held-out images are.
        out["above_real_p99"] = {
            "cosine": float((s_cos > np.percentile(b_cos, 99)).mean()),
            "ssim": float((s_ssim > np.percentile(b_ssim, 99)).mean()),
        }
    return out

"""Precision, recall, density and coverage (Naeem et al., ICML 2020) from feature distances.

Real images R, generated images G, ``k`` nearest neighbours. Each real image has a ball whose radius is the
distance to its k-th nearest other real image; each generated image likewise among the generated ones.
- precision: fraction of generated images inside at least one real ball (realism);
- recall: fraction of real images inside at least one generated ball (diversity);
- density: the number of real balls holding a generated image, averaged over generated images, over k
  (about 1 when the sets are alike; above 1 where generated images crowd dense real regions);
- coverage: fraction of real images whose ball holds at least one generated image.

Strict inequalities, as in the authors' ``prdc`` package: two identical sets give 1, 1, 1, 1 exactly.
torch-fidelity 0.4's ``prc`` (``input1`` generated, ``input2`` real; 0.3 had the two swapped) uses ``<=`` and
k=3: the same precision and recall at the same k on continuous features (tests/unit/test_fidelity_prdc.py).
"""

from __future__ import annotations

import numpy as np

NEAREST_K = 5  # Naeem et al.'s choice; torch-fidelity's prc uses 3
METRICS = ("precision", "recall", "density", "coverage")


def too_small(sizes: dict[str, int], k: int) -> str | None:
    """Why the four metrics cannot be computed for sets of these sizes (a k-th nearest *other* image needs
    more than k images), or None."""
    small = [f"{name} {n}" for name, n in sizes.items() if n <= k]
    if not small:
        return None
    return (
        f"precision/recall/density/coverage need more than nearest_k={k} images per set ({', '.join(small)})"
    )


def pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(len(x), len(y))``, float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.sqrt(np.clip(d2, 0, None))


def knn_radii(d_within: np.ndarray, k: int) -> np.ndarray:
    """Distance of each image to its k-th nearest other image of the same set (its own 0 is the 0-th)."""
    return np.partition(d_within, k, axis=1)[:, k]


def prdc_from_distances(
    d_real: np.ndarray, d_fake: np.ndarray, d_real_fake: np.ndarray, k: int
) -> dict[str, float]:
    """The four metrics from real-real, fake-fake and real-fake distance matrices (zero diagonals)."""
    r_real, r_fake = knn_radii(d_real, k), knn_radii(d_fake, k)
    inside_real = d_real_fake < r_real[:, None]  # [i, j]: generated j inside real i's ball
    return {
        "precision": float(inside_real.any(0).mean()),
        "recall": float((d_real_fake < r_fake[None, :]).any(1).mean()),
        "density": float(inside_real.sum(0).mean() / k),
        "coverage": float((d_real_fake.min(1) < r_real).mean()),
    }


def prdc(real: np.ndarray, fake: np.ndarray, nearest_k: int = NEAREST_K) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` (generated) against ``real`` feature sets."""
    reason = too_small({"real": len(real), "generated": len(fake)}, nearest_k)
    if reason:
        raise ValueError(reason)
    d = pairwise_distances
    return prdc_from_distances(d(real, real), d(fake, fake), d(real, fake), nearest_k)

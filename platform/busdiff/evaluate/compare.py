"""``busdiff fid DIR_A DIR_B``: FID and KID between two image sets, features through the cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from busdiff.evaluate.features import FeatureExtractor
from busdiff.evaluate.fidelity import compare
from busdiff.evaluate.inception import resolve_weights
from busdiff.evaluate.inputs import image_set


def device_name(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error. The rule of
    ``busdiff.models.presets.resolve_device``, without importing diffusers (4 s) for a feature pass."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use auto or cpu")
    return device


def run_fid(
    dir_a: str | Path,
    dir_b: str | Path,
    *,
    split_a: Sequence[str] | None = None,
    split_b: Sequence[str] | None = None,
    label: str | None = None,
    inception_weights: str = "auto",
    cache_dir: str | Path | None = "runs/cache",
    device: str = "auto",
    batch_size: int = 32,
    kid_subset: int | None = None,
    kid_subsets: int = 100,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """FID/KID of the images of ``dir_a`` vs ``dir_b`` (plain folders, or BUSI datasets with a split),
    optionally one class only; the KID subset size is capped by the smaller set. Plain JSON."""
    a, what_a = image_set(dir_a, split_a, label)
    b, what_b = image_set(dir_b, split_b, label)
    weights = resolve_weights(inception_weights, cache_dir or "runs/cache")
    ext = FeatureExtractor(weights, cache_dir, inception_weights, device_name(device), batch_size)
    fa, fb = ext.features(a, "a"), ext.features(b, "b")
    out = {"a": {"what": what_a, "n": len(a)}, "b": {"what": what_b, "n": len(b)}}
    out.update(
        compare(fa, fb, kid_subset=kid_subset, kid_subsets=kid_subsets, bootstrap=bootstrap, seed=seed)
    )
    s = ext.stats
    out["features"] = {
        "extractor": s.extractor_id,
        "weights": s.weights_source,
        "computed": s.n_computed,
        "cached": s.n_cached,
        "seconds": round(s.seconds, 2),
        "images_per_s": None if s.images_per_s is None else round(s.images_per_s, 2),
    }
    return out

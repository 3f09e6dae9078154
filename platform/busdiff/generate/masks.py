"""Conditioning masks of mask-conditioned generation (``generate.controlnet``): which real train image's
lesion mask each planned image takes, the random transform it gets (drawn from the image's own seed, so
the plan alone decides it), and the ControlNet's input made from it (canny edges, as the authors do, or
the mask itself).

A transform is a dict (recorded per image in the sink's metadata): ``angle`` (degrees), ``translate``
(fractions of the size, x and y), ``scale``, ``elastic_alpha`` (pixels), ``elastic_sigma`` (a fraction of
the size) and ``elastic_seed``. The mask actually used is the transformed one; the sink writes it beside
the image.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from busdiff.config import MaskTransformConfig


def draw_transform(t: MaskTransformConfig, seed: int) -> dict[str, Any]:
    """The transform of the image whose text2img seed is ``seed``: each parameter drawn uniformly from
    ``t``'s range by a generator of that seed alone."""
    rng = np.random.default_rng([seed, 0x6D61736B])  # "mask": not the stream of the image's noise
    lo, hi = t.scale
    return {
        "angle": round(float(rng.uniform(-t.degrees, t.degrees)), 4),
        "translate": [round(float(rng.uniform(-t.translate, t.translate)), 4) for _ in range(2)],
        "scale": round(float(rng.uniform(lo, hi)), 4),
        "elastic_alpha": t.elastic_alpha,
        "elastic_sigma": t.elastic_sigma,
        "elastic_seed": int(rng.integers(2**31)),
    }


def transform_mask(mask: np.ndarray, tr: dict[str, Any]) -> np.ndarray:
    """``mask`` (uint8 0/255, square) rotated, zoomed and shifted about its centre, then elastically
    deformed; nearest-neighbour throughout, so it stays a binary mask."""
    from scipy import ndimage

    n = mask.shape[0]
    out = mask
    if tr["angle"] or tr["scale"] != 1 or any(tr["translate"]):
        # output pixel -> input pixel: inverse rotation and zoom about the centre, then the shift
        a = np.deg2rad(tr["angle"])
        inv = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) / tr["scale"]
        centre = np.array([(n - 1) / 2, (n - 1) / 2])
        shift = np.array(tr["translate"][::-1]) * n  # (row, col) = (y, x)
        offset = centre - inv @ (centre + shift)
        out = ndimage.affine_transform(out, inv, offset=offset, order=0, mode="constant", cval=0)
    if tr["elastic_alpha"] > 0:
        rng = np.random.default_rng(tr["elastic_seed"])
        sigma = tr["elastic_sigma"] * n
        dy, dx = (ndimage.gaussian_filter(rng.uniform(-1, 1, (n, n)), sigma, mode="constant")
                  for _ in range(2))
        norm = max(np.abs(dy).max(), np.abs(dx).max(), 1e-12)
        dy, dx = dy / norm * tr["elastic_alpha"], dx / norm * tr["elastic_alpha"]
        rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        out = ndimage.map_coordinates(out, [rows + dy, cols + dx], order=0, mode="constant", cval=0)
    return np.where(out > 127, 255, 0).astype(np.uint8)


def control_image(mask: np.ndarray, conditioning: str) -> np.ndarray:
    """The ControlNet's input for ``mask``: ``canny`` edges (cv2.Canny 100/200, the authors' thresholds)
    or the mask itself, as uint8 H×W×3."""
    if conditioning == "canny":
        import cv2

        mask = cv2.Canny(np.ascontiguousarray(mask), 100, 200)
    elif conditioning != "mask":
        raise ValueError(f"unknown conditioning {conditioning!r}; allowed: canny, mask")
    return np.repeat(mask[:, :, None], 3, axis=2)


def condition_masks(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data stage: each row's conditioning mask (``mask_source``: a JSON list of the record's mask
    files, ``mask_transform``: JSON) loaded and transformed into ``mask`` (uint8 N×size×size)."""
    from busdiff.data.busi import read_mask
    from busdiff.data.records import ImageRecord

    masks = []
    for i, paths, tr in zip(batch["id"], batch["mask_source"], batch["mask_transform"], strict=True):
        # the union of the record's mask files (BUSI has images with two or three lesions); none: empty
        m = read_mask(ImageRecord(str(i), "", "", tuple(json.loads(str(paths)))), (size, size))
        masks.append(transform_mask(m, json.loads(str(tr))) if str(tr) else m)
    return {**batch, "mask": np.stack(masks)}

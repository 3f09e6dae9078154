"""Validation grids: a few images per class at fixed seeds with the adapters as they are at a step, so
the same cell of successive grids shows what training changed."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from busdiff.config import CLASSES, FinetuneValidationConfig
from busdiff.finetune.model import FinetuneModel
from busdiff.viz import image_grid


def validation_images(
    model: FinetuneModel, v: FinetuneValidationConfig, size: int
) -> dict[str, list[np.ndarray]]:
    """``v.n_per_class`` images per class; image ``i`` of class ``c`` uses seed ``v.seed + 1000*c + i``."""
    pipe = model.pipeline()
    model.unet.eval()
    model.text_encoder.eval()
    out: dict[str, list[np.ndarray]] = {}
    try:
        with torch.no_grad(), model.autocast():
            for ci, label in enumerate(CLASSES):
                gens = [
                    torch.Generator("cpu").manual_seed(v.seed + 1000 * ci + i) for i in range(v.n_per_class)
                ]
                images = pipe(
                    [model.prompts[label]] * v.n_per_class,
                    num_inference_steps=v.steps,
                    guidance_scale=v.guidance,
                    height=size,
                    width=size,
                    generator=gens,
                    output_type="np",
                ).images
                out[label] = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
    finally:
        model.train_mode()
    return out


def grid_png(images: dict[str, list[np.ndarray]]) -> bytes:
    """The images as one PNG: a row per class, a column per seed."""
    n = max(len(v) for v in images.values())
    sheet: Image.Image = image_grid(
        [images[c] for c in CLASSES],
        row_labels=list(CLASSES),
        col_labels=[f"seed {i}" for i in range(n)],
    )
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()

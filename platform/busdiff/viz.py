"""Pictures people look at instead of reading numbers: labelled image grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def image_grid(
    rows: Sequence[Sequence[np.ndarray | Image.Image]],
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    cell: int = 128,
    pad: int = 4,
) -> Image.Image:
    """Lay ``rows`` of images out as a grid, each scaled to ``cell`` px, with optional labels."""
    n_cols = max(len(r) for r in rows)
    left = 110 if row_labels else 0
    top = 18 if col_labels else 0
    width = left + n_cols * (cell + pad) + pad
    height = top + len(rows) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, text in enumerate(col_labels):
        draw.text((left + pad + j * (cell + pad), 3), text, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = top + pad + i * (cell + pad)
        if i < len(row_labels):
            draw.text((4, y + cell // 2 - 6), row_labels[i], fill=(0, 0, 0))
        for j, img in enumerate(row):
            tile = to_pil(img).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (left + pad + j * (cell + pad), y))
    return sheet

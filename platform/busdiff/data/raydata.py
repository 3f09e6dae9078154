"""A BUSI dataset as a Ray Dataset with ``id``, ``label``, ``split``, ``image`` and ``mask`` columns,
decoded in parallel by Ray tasks (the later stages' input)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from busdiff.data.busi import read_image, read_mask
from busdiff.data.records import ImageRecord

if TYPE_CHECKING:
    import ray.data


def decode_record(record: ImageRecord, size: int | None = None) -> dict[str, Any]:
    """One row: the image as uint8 H×W×3, the union mask as uint8 H×W (0/255), resized when ``size``."""
    image = read_image(record)
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    mask = read_mask(record, size=image.size)
    return {
        "id": record.id,
        "label": record.label,
        "split": record.split or "none",
        "image": np.asarray(image, dtype=np.uint8),
        "mask": mask,
    }


def to_ray_dataset(records: list[ImageRecord], size: int | None = None) -> ray.data.Dataset:
    """Decode ``records`` on the connected Ray cluster. Give ``size`` for images of mixed sizes
    (a fixed shape keeps the columns as tensors)."""
    import ray

    items = [r.to_dict() for r in records]

    def _decode(row: dict[str, Any]) -> dict[str, Any]:
        return decode_record(ImageRecord(**{**row, "mask_paths": tuple(row["mask_paths"])}), size)

    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 32, 64))).map(_decode)

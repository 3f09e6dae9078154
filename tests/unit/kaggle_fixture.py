"""Small hand-made BUSI copies for unit tests (no phantom generator): Kaggle layout and manifest layout.

The Kaggle copy (``make_kaggle``) mimics the original's quirks on a tiny scale:

=================  ======  ===============================================================
file               size    note
=================  ======  ===============================================================
benign (1).png     64x48   mask mode '1'
benign (2).png     80x60   ``_mask.png`` mode 'RGB' + ``_mask_1.png`` mode 'RGBA' (union)
benign (3).png     72x72   mask mode 'L'
benign (4).png     64x48   benign (1) with a small patch altered: a near duplicate
benign (10).png    50x70   all-zero mask: an empty lesion mask
malignant (1).png  72x72   byte copy of benign (3): an exact duplicate across classes
malignant (2).png  96x64   mask mode 'RGBA'
normal (1).png     56x56   all-zero mask mode 'L'
normal (2).png     60x40   all-zero mask mode '1'
=================  ======  ===============================================================
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

KAGGLE_DIR = "Dataset_BUSI_with_GT"


def smooth_image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (low-res noise, upscaled) whose perceptual hash is stable and distinctive."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(low, "RGB").resize((width, height), Image.BICUBIC)
    return img.convert(mode)


def rect_mask(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean (height, width) mask with ``box = (x0, y0, x1, y1)`` set."""
    m = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def save_mask(fg: np.ndarray, path: Path, mode: str) -> None:
    """Write a boolean mask as the given PIL mode with values 0/255 (RGBA: opaque everywhere)."""
    a = fg.astype(np.uint8) * 255
    if mode == "1":
        Image.fromarray(a, "L").convert("1").save(path)
    elif mode == "L":
        Image.fromarray(a, "L").save(path)
    elif mode == "RGB":
        Image.fromarray(np.stack([a] * 3, axis=-1), "RGB").save(path)
    elif mode == "RGBA":
        Image.fromarray(np.stack([a, a, a, np.full_like(a, 255)], axis=-1), "RGBA").save(path)
    else:
        raise ValueError(mode)


@dataclass
class KaggleFixture:
    root: Path  # the folder that contains Dataset_BUSI_with_GT
    base: Path  # Dataset_BUSI_with_GT itself
    ids: list[str]
    sizes: dict[str, tuple[int, int]]
    masks: dict[str, np.ndarray]  # expected union mask (bool) per id
    exact_pair: tuple[str, str] = ("benign_0003", "malignant_0001")
    near_pair: tuple[str, str] = ("benign_0001", "benign_0004")
    empty_lesion_masks: list[str] = field(default_factory=lambda: ["benign_0010"])

    def image(self, rid: str) -> Path:
        label, n = rid.rsplit("_", 1)
        return self.base / label / f"{label} ({int(n)}).png"

    def mask(self, rid: str, k: int = 0) -> Path:
        label, n = rid.rsplit("_", 1)
        return self.base / label / f"{label} ({int(n)})_mask{'' if k == 0 else f'_{k}'}.png"


def make_kaggle(parent: Path) -> KaggleFixture:
    """Write the Kaggle copy of the module docstring under ``parent/Dataset_BUSI_with_GT``."""
    base = parent / KAGGLE_DIR
    for c in ("benign", "malignant", "normal"):
        (base / c).mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, int]] = {}
    masks: dict[str, np.ndarray] = {}

    def add(label: str, n: int, img: Image.Image, mask_parts: list[tuple[np.ndarray, str]]) -> None:
        rid = f"{label}_{n:04d}"
        img.save(base / label / f"{label} ({n}).png")
        union = np.zeros((img.height, img.width), dtype=bool)
        for k, (fg, mode) in enumerate(mask_parts):
            suffix = "_mask" if k == 0 else f"_mask_{k}"
            save_mask(fg, base / label / f"{label} ({n}){suffix}.png", mode)
            union |= fg
        sizes[rid] = (img.width, img.height)
        masks[rid] = union

    b1 = smooth_image(1, 64, 48)
    add("benign", 1, b1, [(rect_mask(64, 48, (10, 10, 30, 25)), "1")])
    add(
        "benign",
        2,
        smooth_image(2, 80, 60),
        [
            (rect_mask(80, 60, (5, 5, 20, 20)), "RGB"),
            (rect_mask(80, 60, (40, 30, 70, 50)), "RGBA"),
        ],
    )
    add("benign", 3, smooth_image(3, 72, 72), [(rect_mask(72, 72, (20, 20, 50, 40)), "L")])
    near = np.asarray(b1).copy()
    near[20:23, 40:43] = np.clip(near[20:23, 40:43].astype(int) + 8, 0, 255).astype(np.uint8)
    add("benign", 4, Image.fromarray(near, "RGB"), [(rect_mask(64, 48, (12, 10, 30, 26)), "1")])
    add("benign", 10, smooth_image(10, 50, 70), [(np.zeros((70, 50), dtype=bool), "L")])
    # malignant (1) is a byte copy of benign (3), with a different mask
    shutil.copyfile(base / "benign" / "benign (3).png", base / "malignant" / "malignant (1).png")
    m1 = rect_mask(72, 72, (0, 0, 10, 10))
    save_mask(m1, base / "malignant" / "malignant (1)_mask.png", "RGBA")
    sizes["malignant_0001"] = (72, 72)
    masks["malignant_0001"] = m1
    add("malignant", 2, smooth_image(22, 96, 64), [(rect_mask(96, 64, (30, 20, 60, 50)), "RGBA")])
    add("normal", 1, smooth_image(31, 56, 56), [(np.zeros((56, 56), dtype=bool), "L")])
    add("normal", 2, smooth_image(32, 60, 40), [(np.zeros((40, 60), dtype=bool), "1")])
    ids = sorted(sizes, key=lambda i: (i.rsplit("_", 1)[0], i))
    return KaggleFixture(root=parent, base=base, ids=ids, sizes=sizes, masks=masks)


@dataclass
class ManifestFixture:
    root: Path
    rows: list[dict[str, str]]


def make_manifest(root: Path, splits: bool = True) -> ManifestFixture:
    """A busi-256-like manifest copy: grayscale 32x32 images ``<class>/<class>_<NNNN>.png`` + masks."""
    plan = [
        ("benign", 1, "train"),
        ("benign", 7, "val"),
        ("benign", 12, "test"),
        ("malignant", 3, "train"),
        ("malignant", 5, "test"),
        ("normal", 2, "train"),
    ]
    rows = []
    for i, (label, n, split) in enumerate(plan):
        (root / label).mkdir(parents=True, exist_ok=True)
        file = f"{label}/{label}_{n:04d}.png"
        mask = f"{label}/{label}_{n:04d}_mask.png"
        smooth_image(100 + i, 32, 32, "L").save(root / file)
        fg = rect_mask(32, 32, (4, 4, 12, 12)) if label != "normal" else np.zeros((32, 32), dtype=bool)
        save_mask(fg, root / mask, "L")
        rows.append(
            {
                "file": file,
                "mask": mask,
                "label": label,
                "source_name": f"{label}/{label} ({n}).png",
                "orig_width": "500",
                "orig_height": "400",
                "sha256": hashlib.sha256((root / file).read_bytes()).hexdigest(),
                "split": split if splits else "",
                "orig_sha256": "",
                "n_source_masks": "1",
            }
        )
    write_manifest(root, rows)
    return ManifestFixture(root=root, rows=rows)


def write_manifest(root: Path, rows: list[dict[str, str]]) -> None:
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

"""Read BUSI (Breast Ultrasound Images) into :class:`ImageRecord` lists.

Two layouts are understood:

* ``kaggle`` -- the original ``Dataset_BUSI_with_GT/<class>/<class> (N).png`` with ``<class> (N)_mask.png``
  (and for some cases ``_mask_1.png``, ``_mask_2.png``) beside it. ``root`` may be the
  ``Dataset_BUSI_with_GT`` folder itself or a folder containing it. Records have no split.
* ``manifest`` -- a folder with ``manifest.csv`` (columns ``file,mask,label[,sha256,split,...]``, paths
  relative to the folder), e.g. ``busi-256``. The split column is kept as is.

* ``corpus`` -- a busdiff generation sink (``samples/metadata.parquet``): each synthetic image with the
  mask it was conditioned on (``masks/``, with ``generate.controlnet``; none otherwise), split
  ``synthetic``, ids the corpus's own.

The first two give the same ids, ``<class>_<NNNN>`` (``benign (433).png`` -> ``benign_0433``). Every
problem found is collected first; then one :class:`DatasetError` lists all of them, or with
``skip_bad=True`` the bad files are left out and listed in :attr:`LoadResult.bad_files`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from busdiff.config import CLASSES
from busdiff.data.records import BadFile, DatasetError, ImageRecord, LoadResult
from busdiff.storage import readable

LAYOUTS = ("auto", "kaggle", "manifest", "corpus")
CORPUS_METADATA = "samples/metadata.parquet"
KAGGLE_DIR = "Dataset_BUSI_with_GT"
MANIFEST = "manifest.csv"
MANIFEST_REQUIRED = ("file", "mask", "label")

# BadFile.kind values
MISSING_ROOT = "missing_root"
UNREADABLE_IMAGE = "unreadable_image"
UNREADABLE_MASK = "unreadable_mask"
MASK_WITHOUT_IMAGE = "mask_without_image"
IMAGE_WITHOUT_MASK = "image_without_mask"
MASK_SIZE_MISMATCH = "mask_size_mismatch"
UNKNOWN_CLASS = "unknown_class"
BAD_NAME = "bad_name"
MISSING_FILE = "missing_file"
DUPLICATE_ID = "duplicate_id"
SHA256_MISMATCH = "sha256_mismatch"
BAD_MANIFEST = "bad_manifest"
EMPTY_DATASET = "empty_dataset"

_LAYOUT_HINT = (
    "root must be a BUSI folder in Kaggle layout (Dataset_BUSI_with_GT/<class>/<class> (N).png with "
    "<class> (N)_mask.png beside it, <class> one of " + ", ".join(CLASSES) + ") or in manifest layout "
    "(a folder with manifest.csv, like busi-256)"
)
_SKIP_HINT = "pass skip_bad=True (--skip-bad / data.skip_bad=true) to leave these files out and list them"

# "benign (12).png", "benign (12)_mask.png", "benign (12)_mask_1.png"
_KAGGLE_NAME = re.compile(r"^(?P<cls>[A-Za-z]+) \((?P<n>\d+)\)(?P<mask>_mask(?:_(?P<k>\d+))?)?\.png$")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_id(label: str, n: int) -> str:
    """The stable id of image N of a class: ``make_id("benign", 433) == "benign_0433"``."""
    return f"{label}_{n:04d}"


def _inspect(path: Path, what: str) -> tuple[int, int, str, str | None]:
    """Read a PNG once: ``(width, height, sha256, problem)``; decodes it fully to prove it is readable.

    The size comes from the header (``Image.open``); ``load()`` then decodes the pixels."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return 0, 0, "", f"cannot read {what}: {e.strerror or e}"
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return 0, 0, digest, f"cannot decode {what}: empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return 0, 0, digest, f"cannot decode {what}: {type(e).__name__}: {e}"
    return w, h, digest, None


def _check_image_and_masks(image: Path, masks: list[Path], bad: list[BadFile]) -> tuple[int, int, str] | None:
    """Verify an image and its masks; append problems to ``bad``; ``(w, h, sha256)`` when all are fine."""
    w, h, digest, problem = _inspect(image, "image")
    if problem:
        bad.append(BadFile(str(image), problem, UNREADABLE_IMAGE))
        return None
    ok = True
    for m in masks:
        mw, mh, _, mproblem = _inspect(m, "mask")
        if mproblem:
            bad.append(BadFile(str(m), f"{mproblem} (mask of {image.name})", UNREADABLE_MASK))
            ok = False
        elif (mw, mh) != (w, h):
            bad.append(
                BadFile(
                    str(m),
                    f"mask size {mw}x{mh} differs from its image {image.name} ({w}x{h})",
                    MASK_SIZE_MISMATCH,
                )
            )
            ok = False
    return (w, h, digest) if ok else None


def _finish(
    records: list[ImageRecord], bad: list[BadFile], root: Path, layout: str, skip_bad: bool
) -> LoadResult:
    if not records:
        empty = BadFile(str(root), f"empty dataset: no usable images found ({layout} layout)", EMPTY_DATASET)
        hint = _LAYOUT_HINT if not bad else "no image is usable; fix the files listed above"
        raise DatasetError([*bad, empty], hint=hint)
    if bad and not skip_bad:
        raise DatasetError(bad, hint=f"{len(bad)} bad file(s); {_SKIP_HINT}")
    records.sort(key=lambda r: (r.label, r.id))
    return LoadResult(records=records, bad_files=bad, layout=layout)


def _visible(entries: Iterable[Path]) -> list[Path]:
    return sorted(
        p for p in entries if not p.name.startswith(".") and p.name not in ("Thumbs.db", "desktop.ini")
    )


def _load_kaggle(root: Path, skip_bad: bool) -> LoadResult:
    base = root / KAGGLE_DIR if (root / KAGGLE_DIR).is_dir() else root
    bad: list[BadFile] = []
    records: list[ImageRecord] = []
    entries = _visible(base.iterdir())
    class_dirs = [p for p in entries if p.is_dir() and p.name in CLASSES]
    allowed = ", ".join(CLASSES)
    for p in entries:
        if p.is_dir() and p.name not in CLASSES:
            bad.append(
                BadFile(str(p), f"unknown class folder {p.name!r}; allowed classes: {allowed}", UNKNOWN_CLASS)
            )
        elif not p.is_dir():
            bad.append(BadFile(str(p), f"file outside the class folders ({allowed}) of {base}", BAD_NAME))
    if not class_dirs:
        bad.append(BadFile(str(base), f"no class folder ({allowed}) found; {_LAYOUT_HINT}", EMPTY_DATASET))
        raise DatasetError(bad)

    for cdir in class_dirs:
        label = cdir.name
        images: dict[int, Path] = {}
        masks: dict[int, dict[int, Path]] = {}
        for f in _visible(cdir.iterdir()):
            m = _KAGGLE_NAME.match(f.name)
            if f.is_dir() or not m:
                bad.append(
                    BadFile(
                        str(f),
                        f"name does not match '{label} (N).png' or '{label} (N)_mask[_K].png'",
                        BAD_NAME,
                    )
                )
                continue
            if m["cls"] != label:
                bad.append(
                    BadFile(
                        str(f),
                        f"class {m['cls']!r} in the name but the file is in folder {label!r}",
                        BAD_NAME,
                    )
                )
                continue
            n = int(m["n"])
            if m["mask"] is None:  # an image
                if n in images:
                    bad.append(
                        BadFile(str(f), f"same id {make_id(label, n)} as {images[n].name}", DUPLICATE_ID)
                    )
                    continue
                images[n] = f
            else:
                k = int(m["k"]) if m["k"] else 0
                slot = masks.setdefault(n, {})
                if k in slot:
                    bad.append(BadFile(str(f), f"same mask as {slot[k].name}", DUPLICATE_ID))
                    continue
                slot[k] = f
        for n in sorted(set(masks) - set(images)):
            for k in sorted(masks[n]):
                bad.append(
                    BadFile(
                        str(masks[n][k]),
                        f"mask without image (expected '{label} ({n}).png' beside it)",
                        MASK_WITHOUT_IMAGE,
                    )
                )
        for n in sorted(images):
            image = images[n]
            if n not in masks:
                bad.append(
                    BadFile(
                        str(image),
                        f"image without mask (expected '{label} ({n})_mask.png' beside it)",
                        IMAGE_WITHOUT_MASK,
                    )
                )
                continue
            mask_paths = [masks[n][k] for k in sorted(masks[n])]
            checked = _check_image_and_masks(image, mask_paths, bad)
            if checked is None:
                continue
            w, h, digest = checked
            records.append(
                ImageRecord(
                    id=make_id(label, n),
                    image_path=str(image),
                    label=label,
                    mask_paths=tuple(str(p) for p in mask_paths),
                    split=None,
                    width=w,
                    height=h,
                    sha256=digest,
                )
            )
    return _finish(records, bad, base, "kaggle", skip_bad)


def _load_manifest(root: Path, skip_bad: bool) -> LoadResult:
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise DatasetError(
            BadFile(str(manifest), "missing (layout 'manifest' needs it)", MISSING_FILE), _LAYOUT_HINT
        )
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(BadFile(str(manifest), f"cannot read: {e}", BAD_MANIFEST)) from e
    missing = [c for c in MANIFEST_REQUIRED if c not in columns]
    if missing:
        raise DatasetError(
            BadFile(
                str(manifest),
                f"missing column(s) {', '.join(missing)}; has {', '.join(columns) or 'none'}; "
                f"needs {', '.join(MANIFEST_REQUIRED)} (optional: sha256, split)",
                BAD_MANIFEST,
            )
        )
    bad: list[BadFile] = []
    records: list[ImageRecord] = []
    seen: dict[str, str] = {}
    allowed = ", ".join(CLASSES)
    for line, row in enumerate(rows, start=2):
        where = f"{MANIFEST} line {line}"
        file = (row.get("file") or "").strip()
        label = (row.get("label") or "").strip()
        if not file:
            bad.append(BadFile(str(manifest), f"line {line}: empty 'file'", BAD_MANIFEST))
            continue
        image = root / file
        if label not in CLASSES:
            bad.append(
                BadFile(
                    str(image), f"{where}: unknown label {label!r}; allowed classes: {allowed}", UNKNOWN_CLASS
                )
            )
            continue
        if not image.is_file():
            bad.append(BadFile(str(image), f"listed in {where} but missing", MISSING_FILE))
            continue
        rid = image.stem
        if rid in seen:
            bad.append(BadFile(str(image), f"{where}: same id {rid!r} as {seen[rid]}", DUPLICATE_ID))
            continue
        seen[rid] = str(image)
        mask_names = [m.strip() for m in (row.get("mask") or "").split(";") if m.strip()]
        if not mask_names:
            bad.append(
                BadFile(str(image), f"image without mask ({where} has an empty 'mask')", IMAGE_WITHOUT_MASK)
            )
            continue
        mask_paths = [root / m for m in mask_names]
        missing_masks = [m for m in mask_paths if not m.is_file()]
        for m in missing_masks:
            bad.append(BadFile(str(m), f"mask of {file} listed in {where} but missing", MISSING_FILE))
        if missing_masks:
            continue
        checked = _check_image_and_masks(image, mask_paths, bad)
        if checked is None:
            continue
        w, h, digest = checked
        listed = (row.get("sha256") or "").strip().lower()
        if listed and listed != digest:
            bad.append(
                BadFile(str(image), f"sha256 {digest} differs from {where} ({listed})", SHA256_MISMATCH)
            )
            continue
        split = (row.get("split") or "").strip() or None
        records.append(
            ImageRecord(
                id=rid,
                image_path=str(image),
                label=label,
                mask_paths=tuple(str(p) for p in mask_paths),
                split=split,
                width=w,
                height=h,
                sha256=digest,
            )
        )
    return _finish(records, bad, root, "manifest", skip_bad)


def load_dataset(root: str | Path, layout: str = "auto", skip_bad: bool = False) -> LoadResult:
    """Read a BUSI folder (layout ``auto``, ``kaggle`` or ``manifest``) into records sorted by (label, id).

    Every image and mask is decoded once to prove it is readable, and the image's sha256 is computed.
    All problems are collected; then a :class:`DatasetError` lists each bad file and its problem, unless
    ``skip_bad`` is set, in which case the bad files are left out and returned in ``bad_files``. A dataset
    without any usable image always raises.
    """
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise DatasetError(BadFile(str(path), f"dataset root {what}", MISSING_ROOT), _LAYOUT_HINT)
    path = path.resolve()
    if layout == "auto":
        layout = ("manifest" if (path / MANIFEST).is_file() else
                  "corpus" if (path / CORPUS_METADATA).is_file() else "kaggle")
    if layout == "corpus":
        return _load_corpus(path, skip_bad)
    return _load_manifest(path, skip_bad) if layout == "manifest" else _load_kaggle(path, skip_bad)


def _load_corpus(root: Path, skip_bad: bool) -> LoadResult:
    import pyarrow.parquet as pq

    meta = root / CORPUS_METADATA
    if not meta.is_file():
        raise DatasetError(BadFile(str(meta), "missing: not a busdiff generation sink", MISSING_FILE))
    columns = pq.read_schema(meta).names
    rows = pq.read_table(meta).to_pylist()
    records, bad = [], []
    for row in rows:
        image = root / "samples" / row["file_name"]
        masks = [root / row["mask_path"]] if "mask_path" in columns and row["mask_path"] else []
        missing = [f for f in (image, *masks) if not f.is_file()]
        if missing:
            bad += [BadFile(str(f), f"listed in {CORPUS_METADATA}, missing", MISSING_FILE) for f in missing]
            continue
        checked = _check_image_and_masks(image, masks, bad)
        if checked:
            w, h, digest = checked
            records.append(ImageRecord(row["id"], str(image), row["class"], tuple(str(m) for m in masks),
                                       "synthetic", w, h, digest))
    return _finish(records, bad, root, "corpus", skip_bad)


def _mask_bool(im: Image.Image) -> np.ndarray:
    """Foreground of one mask file, whatever its mode: any non-zero colour (and non-transparent)."""
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode == "1":
        return np.asarray(im, dtype=bool)
    arr = np.asarray(im)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return (arr[..., :-1].max(axis=-1) > 0) & (arr[..., -1] > 0)
    if arr.ndim == 3:
        return arr.max(axis=-1) > 0
    return arr > 0


def read_mask(record: ImageRecord, size: tuple[int, int] | None = None) -> np.ndarray:
    """Union of all of a record's mask files as a ``(height, width)`` uint8 array of 0/255.

    ``size`` is ``(width, height)`` like PIL's; by default the image's size. Masks are resized
    nearest-neighbour when their size differs. A record without masks gives all zeros."""
    if size is None:
        if record.width > 0 and record.height > 0:
            size = (record.width, record.height)
        else:
            with Image.open(readable(record.image_path)) as im:
                size = im.size
    w, h = int(size[0]), int(size[1])
    union = np.zeros((h, w), dtype=bool)
    for p in record.mask_paths:
        with Image.open(readable(p)) as im:  # a local file, or an object (busdiff.storage)
            im.load()
            fg = _mask_bool(im)
        if fg.shape != (h, w):
            fg = np.asarray(Image.fromarray(fg.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
        union |= fg
    return union.astype(np.uint8) * 255


def read_image(record: ImageRecord) -> Image.Image:
    """The record's image, decoded, as an RGB PIL image (a local file, or an object: busdiff.storage)."""
    with Image.open(readable(record.image_path)) as im:
        im.load()
        return im.convert("RGB")

"""What evaluation reads: real BUSI records (by split and class) and folders of synthetic images.

A synthetic folder holds one subfolder per class (``<class>/<id>.png``, as the generation sink writes
``samples/<class>/<id>.png``); other files beside them (parquet, json) are ignored. ``busdiff fid`` also
takes any image folder (images found recursively, class from the first subfolder when it names one) or a
BUSI dataset (manifest or Kaggle layout) with a split.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from busdiff.config import CLASSES, SplitConfig
from busdiff.data.busi import MANIFEST, load_dataset
from busdiff.data.records import ImageRecord
from busdiff.data.splits import assign_splits
from busdiff.storage import is_uri, list_dir, local_path, readable

if TYPE_CHECKING:  # busdiff.evaluate.features imports torch: imported where items are made, so that
    from busdiff.evaluate.features import ImageItem  # check_synthetic runs before any heavy import

#: What evaluation reads as an image.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_KAGGLE_IMAGE = re.compile(r"^[A-Za-z]+ \(\d+\)\.png$")


class InputError(ValueError):
    """Bad evaluation input (empty folder, unknown class, missing split); names the path or field."""


def item_of(record: ImageRecord) -> ImageItem:
    from busdiff.evaluate.features import ImageItem

    return ImageItem(id=record.id, path=record.image_path, label=record.label, sha256=record.sha256)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _synthetic_files(root: str, classes: Sequence[str]) -> list[tuple[str, str]]:
    """``(class, path)`` of every image of ``root/<class>/`` (a folder, or a prefix on an object store);
    InputError as :func:`read_synthetic` says."""
    listing = list_dir(root)
    if listing is None:
        raise InputError(f"synthetic folder {root} does not exist (evaluate.synthetic)")
    allowed = ", ".join(classes)
    stray = [f for f in listing[0] if _is_image(f)]
    if stray:
        raise InputError(
            f"{root}: {len(stray)} image(s) outside class folders (e.g. {stray[0]}); put synthetic "
            f"images in {root}/<class>/ with <class> one of {allowed}"
        )
    files: list[tuple[str, str]] = []
    for sub in (d for d in listing[1] if not d.startswith(".")):
        folder = f"{root}/{sub}"
        images = [f for f in (list_dir(folder) or ([], []))[0] if _is_image(f)]
        if sub not in classes:
            if images and sub not in CLASSES:
                raise InputError(f"{folder}: unknown class folder {sub!r}; allowed: {allowed}")
            continue  # a class not evaluated (evaluate.classes), or e.g. a folder of the sink's metadata
        files += [(sub, f"{folder}/{f}") for f in images]
    if not files:
        raise InputError(
            f"synthetic folder {root} holds no images (evaluate.synthetic; "
            f"expected {root}/<class>/*.png, <class> one of {allowed})"
        )
    return files


def _root(root: str | Path) -> str:
    """A local folder as an absolute path (``~`` expanded); a URI as given, without a trailing slash."""
    return str(root).rstrip("/") if is_uri(root) else str(local_path(root))


def read_synthetic(root: str | Path, classes: Sequence[str] = CLASSES) -> list[ImageItem]:
    """Images of ``root/<class>/`` for each class in ``classes``; ids are ``<class>/<file stem>``.

    Raises InputError when the folder is missing, holds images outside class folders, has a subfolder that
    is not a known class, or has no image at all."""
    from busdiff.evaluate.features import ImageItem

    return [
        ImageItem(id=f"{label}/{Path(p).stem}", path=p, label=label, source="synthetic")
        for label, p in _synthetic_files(_root(root), classes)
    ]


def _unreadable(path: str) -> str | None:
    """Why ``path`` is not a readable image, or None. PIL's ``verify`` reads the header and, for a PNG,
    every chunk's checksum without decoding the pixels: about 0.1 ms for a 512 px image."""
    try:
        with Image.open(readable(path)) as im:
            im.verify()
    except UnidentifiedImageError:
        return "not an image file PIL knows"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return f"{type(e).__name__}: {e}"
    return None


def check_synthetic(root: str | Path, classes: Sequence[str] = CLASSES) -> int:
    """The checks of :func:`read_synthetic` plus a cheap one of every image's file (see ``_unreadable``),
    without torch or Ray: InputError names the first bad file and counts the others. Returns the number
    of images."""
    files = _synthetic_files(_root(root), classes)
    bad = [(p, why) for _, p in files if (why := _unreadable(p))]
    if bad:
        (first, why), more = bad[0], f"; {len(bad) - 1} more like it" if len(bad) > 1 else ""
        raise InputError(f"evaluate.synthetic={root}: {first} is not a readable image ({why}){more}")
    return len(files)


def real_records(
    root: str | Path, layout: str = "auto", split: SplitConfig | None = None, skip_bad: bool = False
) -> list[ImageRecord]:
    """BUSI records with a split each (the manifest's, or :func:`assign_splits` for Kaggle copies)."""
    loaded = load_dataset(root, layout=layout, skip_bad=skip_bad)
    return assign_splits(loaded.records, split or SplitConfig())


def select(
    records: Iterable[ImageRecord], splits: Sequence[str] | None = None, classes: Sequence[str] | None = None
) -> list[ImageRecord]:
    return [
        r
        for r in records
        if (splits is None or r.split in splits) and (classes is None or r.label in classes)
    ]


def _is_busi(path: Path) -> bool:
    if (path / MANIFEST).is_file():
        return True
    base = path / "Dataset_BUSI_with_GT" if (path / "Dataset_BUSI_with_GT").is_dir() else path
    for c in CLASSES:
        d = base / c
        if d.is_dir() and any(_KAGGLE_IMAGE.match(p.name) for p in d.iterdir()):
            return True
    return False


def image_set(
    path: str | Path, splits: Sequence[str] | None = None, label: str | None = None
) -> tuple[list[ImageItem], str]:
    """Images of ``path`` for ``busdiff fid``: a BUSI dataset (split/class selectable; masks excluded) or
    any folder of images (recursive). Returns the items and a description of what was read."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError(f"{p} is not a folder")
    if _is_busi(p):
        recs = real_records(p)
        chosen = select(recs, splits, [label] if label else None)
        what = (
            f"BUSI dataset {p}"
            + (f", split {'+'.join(splits)}" if splits else "")
            + (f", class {label}" if label else "")
        )
        if not chosen:
            have = sorted({r.split or "none" for r in recs})
            raise InputError(f"{what}: no images selected (splits present: {', '.join(have)})")
        return [item_of(r) for r in chosen], what
    if splits:
        raise InputError(
            f"{p} is a plain image folder: it has no splits (--split-a/--split-b need a BUSI dataset)"
        )
    from busdiff.evaluate.features import ImageItem

    items = []
    for f in sorted(x for x in p.rglob("*") if x.is_file() and x.suffix.lower() in IMAGE_SUFFIXES):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts):
            continue
        cls = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in CLASSES else None
        if label is None or cls == label:
            items.append(ImageItem(id=str(rel.with_suffix("")), path=str(f), label=cls, source="folder"))
    if not items:
        raise InputError(
            f"{p}: no images found"
            + (f" of class {label}" if label else "")
            + f" (looked for {', '.join(IMAGE_SUFFIXES)} recursively)"
        )
    return items, f"image folder {p}" + (f", class {label}" if label else "")


def write_phantom_synthetic(root: str | Path, n_per_class: int, seed: int = 2, size: int = 64) -> Path:
    """A stand-in "synthetic" folder in the generation sink's layout (``root/<class>/syn_<class>_<NNNN>.png``,
    no masks) made by the phantom generator, for smoke runs, tests and benchmarks without a generator."""
    import shutil
    import tempfile

    from busdiff.data.phantom import write_phantom

    root = Path(root)
    with tempfile.TemporaryDirectory(
        prefix=".phantom-", dir=root.parent if root.parent.exists() else None
    ) as tmp:
        for p in write_phantom(tmp, n_per_class, seed=seed, size=size):
            label = p.parent.name
            n = int(p.stem.split("(")[1].rstrip(")"))
            (root / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / label / f"syn_{label}_{n:04d}.png")
    return root

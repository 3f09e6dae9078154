"""The data-quality report: duplicates, leaks across class/split, empty masks, sizes, bad files.

Split in two so a Ray job can map the expensive part in parallel:

* :func:`hash_image` -- per image (decode, sha256, perceptual hash, mask pixel count); a plain dict.
* :func:`build_report` -- a pure reducer over all records and their hashes; the result is plain JSON.

:func:`check_dataset` does both in-process; :func:`format_report` renders a compact text summary.
"""

from __future__ import annotations

import hashlib
import io
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from busdiff.config import QualityConfig
from busdiff.data.busi import IMAGE_WITHOUT_MASK, MASK_WITHOUT_IMAGE, read_mask
from busdiff.data.records import BadFile, ImageRecord

SPLIT_ORDER = ("train", "val", "test", "none")
LESION_CLASSES = ("benign", "malignant")
_BLOCK = 512  # rows of the pairwise distance matrix computed at once


def hash_image(record: ImageRecord, hash_size: int = 8) -> dict[str, Any]:
    """Hash one image: ``{"id", "sha256", "phash", "width", "height", "mask_pixels", "problem"}``.

    ``phash`` is ``imagehash.phash`` of the grayscale image as a hex string; ``mask_pixels`` the number of
    non-zero pixels of the union mask (-1 when the record has no mask); ``problem`` is None or says why
    the image (or a mask) could not be read, in which case the missing values are None / -1.
    """
    out: dict[str, Any] = {
        "id": record.id,
        "sha256": record.sha256,
        "phash": None,
        "width": record.width,
        "height": record.height,
        "mask_pixels": -1,
        "problem": None,
    }
    try:
        data = Path(record.image_path).read_bytes()
        out["sha256"] = hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            out["width"], out["height"] = im.size
            gray = im.convert("L")
        out["phash"] = str(imagehash.phash(gray, hash_size=hash_size))
    except Exception as e:  # unreadable file or undecodable image
        out["problem"] = f"{record.image_path}: cannot decode image: {type(e).__name__}: {e}"
        return out
    if record.mask_paths:
        try:
            out["mask_pixels"] = int(np.count_nonzero(read_mask(record, size=(out["width"], out["height"]))))
        except Exception as e:
            out["problem"] = f"{record.id}: cannot read mask: {type(e).__name__}: {e}"
    return out


def _as_bad(items: Iterable[BadFile | dict[str, Any]]) -> list[BadFile]:
    return [b if isinstance(b, BadFile) else BadFile(**b) for b in items]


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _hex_to_words(hexes: Sequence[str]) -> np.ndarray:
    """Hex hashes of equal length -> ``(n, words)`` uint64 array (left-padded to a multiple of 64 bits)."""
    if len({len(h) for h in hexes}) > 1:
        raise ValueError("perceptual hashes of different lengths (mixed hash_size?)")
    width = -(-len(hexes[0]) // 16) * 16
    padded = [h.rjust(width, "0") for h in hexes]
    return np.array([[int(h[i : i + 16], 16) for i in range(0, width, 16)] for h in padded], dtype=np.uint64)


def near_pairs(hexes: Sequence[str], max_distance: int) -> list[tuple[int, int, int]]:
    """All index pairs ``(i, j, distance)``, ``i < j``, whose hashes differ in at most ``max_distance`` bits.

    Vectorised: XOR of packed 64-bit words and a popcount over a block of rows at a time."""
    n = len(hexes)
    if n < 2:
        return []
    words = _hex_to_words(hexes)
    out: list[tuple[int, int, int]] = []
    for start in range(0, n, _BLOCK):
        block = words[start : start + _BLOCK]
        dist = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(axis=-1, dtype=np.int64)
        rows = np.arange(start, start + len(block))[:, None]
        hit = (dist <= max_distance) & (np.arange(n)[None, :] > rows)
        ii, jj = np.nonzero(hit)
        out.extend(zip((ii + start).tolist(), jj.tolist(), dist[ii, jj].tolist(), strict=True))
    return out


def _size_distribution(sizes: list[tuple[int, int]], top: int = 10) -> dict[str, Any]:
    if not sizes:
        return {"width": None, "height": None, "common_sizes": [], "n_distinct": 0}

    def stats(values: list[int]) -> dict[str, float | int]:
        med = statistics.median(values)
        return {
            "min": min(values),
            "median": int(med) if float(med).is_integer() else float(med),
            "max": max(values),
        }

    common = Counter(sizes).most_common(top)
    return {
        "width": stats([w for w, _ in sizes]),
        "height": stats([h for _, h in sizes]),
        "common_sizes": [{"width": w, "height": h, "count": c} for (w, h), c in common],
        "n_distinct": len(set(sizes)),
    }


def build_report(
    records: list[ImageRecord],
    hashes: list[dict[str, Any]],
    cfg: QualityConfig,
    bad_files: Iterable[BadFile | dict[str, Any]] = (),
) -> dict[str, Any]:
    """Reduce records + their :func:`hash_image` dicts to the quality report (plain JSON types only).

    ``hashes`` may come in any order (matched by id); ``bad_files`` are the loader's (``BadFile`` or dicts).
    """
    by_id = {h["id"]: h for h in hashes}
    missing = [r.id for r in records if r.id not in by_id]
    if missing:
        raise ValueError(f"no hash for {len(missing)} record(s): {', '.join(missing[:10])}")
    records = sorted(records, key=lambda r: (r.label, r.id))
    rec = {r.id: r for r in records}
    bad = _as_bad(bad_files)

    # counts
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        per = counts.setdefault(r.label, {})
        per[r.split or "none"] = per.get(r.split or "none", 0) + 1
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    counts = {
        lab: dict(sorted(per.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))
        for lab, per in counts.items()
    }

    sizes = [
        (int(by_id[r.id]["width"]), int(by_id[r.id]["height"]))
        for r in records
        if by_id[r.id]["width"] and by_id[r.id]["height"]
    ]

    # exact duplicates: identical bytes
    groups: dict[str, list[str]] = defaultdict(list)
    for r in records:
        digest = by_id[r.id]["sha256"] or r.sha256
        if digest:
            groups[digest].append(r.id)
    exact = sorted(
        _pair(ids[i], ids[j])
        for ids in groups.values()
        for i in range(len(ids))
        for j in range(i + 1, len(ids))
    )
    exact_set = set(exact)

    # near duplicates: perceptual hashes within cfg.near_duplicate_distance bits, not byte-identical
    hashed = [r.id for r in records if by_id[r.id]["phash"]]
    near = []
    for i, j, d in near_pairs([by_id[x]["phash"] for x in hashed], cfg.near_duplicate_distance):
        a, b = _pair(hashed[i], hashed[j])
        if (a, b) not in exact_set:
            near.append({"a": a, "b": b, "distance": int(d)})
    near.sort(key=lambda p: (p["a"], p["b"]))

    # leaks: duplicates whose two images differ in class or split
    leaks = []
    candidates = [(a, b, "exact", 0) for a, b in exact] + [
        (p["a"], p["b"], "near", p["distance"]) for p in near
    ]
    for a, b, kind, d in candidates:
        ra, rb = rec[a], rec[b]
        cross = [
            name
            for name, differs in (("class", ra.label != rb.label), ("split", ra.split != rb.split))
            if differs
        ]
        if cross:
            leaks.append(
                {
                    "a": a,
                    "b": b,
                    "kind": kind,
                    "distance": d,
                    "cross": cross,
                    "a_class": ra.label,
                    "b_class": rb.label,
                    "a_split": ra.split,
                    "b_split": rb.split,
                }
            )
    leaks.sort(key=lambda x: (x["a"], x["b"]))

    empty_masks = [r.id for r in records if r.label in LESION_CLASSES and by_id[r.id]["mask_pixels"] == 0]
    normal_with_mask = [r.id for r in records if r.label == "normal" and by_id[r.id]["mask_pixels"] > 0]
    images_without_mask = sorted(
        [r.image_path for r in records if not r.mask_paths]
        + [b.path for b in bad if b.kind == IMAGE_WITHOUT_MASK]
    )
    masks_without_image = sorted(b.path for b in bad if b.kind == MASK_WITHOUT_IMAGE)
    unreadable = [{"id": r.id, "problem": by_id[r.id]["problem"]} for r in records if by_id[r.id]["problem"]]

    n_cross_class = sum("class" in x["cross"] for x in leaks)
    n_cross_split = sum("split" in x["cross"] for x in leaks)
    per_class = ", ".join(f"{lab} {sum(per.values())}" for lab, per in counts.items())
    summary = [
        f"{len(records)} images ({per_class})",
        f"{len(exact)} exact duplicate pair(s) (identical bytes), {len(near)} near-duplicate pair(s) "
        f"(perceptual hash distance <= {cfg.near_duplicate_distance})",
        f"{len(leaks)} leak(s): duplicate pairs across class ({n_cross_class}) or split ({n_cross_split})",
        f"{len(empty_masks)} benign/malignant image(s) with an empty mask"
        + (
            f": {', '.join(empty_masks[:10])}" + (" ..." if len(empty_masks) > 10 else "")
            if empty_masks
            else ""
        ),
        f"{len(images_without_mask)} image(s) without mask, {len(masks_without_image)} mask(s) without "
        f"image, {len(bad)} bad file(s), {len(unreadable)} image(s) whose image or mask could not be read",
    ]
    if normal_with_mask:
        summary.append(f"{len(normal_with_mask)} normal image(s) with a non-empty mask")

    return {
        "n_images": len(records),
        "counts": counts,
        "size_distribution": _size_distribution(sizes),
        "config": cfg.model_dump(),
        "exact_duplicates": [list(p) for p in exact],
        "near_duplicates": near,
        "leaks": leaks,
        "empty_masks": empty_masks,
        "normal_with_mask": normal_with_mask,
        "images_without_mask": images_without_mask,
        "masks_without_image": masks_without_image,
        "unreadable": unreadable,
        "bad_files": [b.to_dict() for b in bad],
        "summary": summary,
    }


def check_dataset(
    records: list[ImageRecord], cfg: QualityConfig, bad_files: Iterable[BadFile | dict[str, Any]] = ()
) -> dict[str, Any]:
    """Hash every image in this process, then :func:`build_report`; adds ``timings`` (seconds)."""
    t0 = time.perf_counter()
    hashes = [hash_image(r, cfg.hash_size) for r in records]
    t1 = time.perf_counter()
    report = build_report(records, hashes, cfg, bad_files)
    t2 = time.perf_counter()
    report["timings"] = {"hash_s": round(t1 - t0, 3), "report_s": round(t2 - t1, 3)}
    return report


def _split_line(split: dict[str, Any]) -> str:
    """Where the split of the counts and leaks comes from (``run_data_check``'s ``report["split"]``)."""
    if split["source"] == "data":
        return "split: the data's own"
    if split["source"] == "assigned":
        return (
            "split: none in the data; shown as fine-tuning, generation and evaluation assign it (data.split: "
            f"train {split['train']:g} / val {split['val']:g} / test {split['test']:g}, seed {split['seed']})"
        )
    return f"split: none shown, and the other stages refuse this data: {split['problem']}"


def _sizes_line(dist: dict[str, Any]) -> str:
    """``image sizes: ...`` from :func:`_size_distribution`: the one size, or ranges, medians and the most
    common sizes."""
    common = dist["common_sizes"]
    if not common:
        return "image sizes: none readable"
    if dist["n_distinct"] == 1:
        return f"image sizes: all {common[0]['width']}x{common[0]['height']}"
    w, h = dist["width"], dist["height"]
    top = ", ".join(f"{c['width']}x{c['height']} ({c['count']})" for c in common[:3])
    return (
        f"image sizes: {dist['n_distinct']} distinct, width {w['min']}-{w['max']} (median {w['median']}), "
        f"height {h['min']}-{h['max']} (median {h['median']}); most common {top}"
    )


def format_report(report: dict[str, Any], max_leaks: int = 30) -> str:
    """A compact text summary: counts table, where the split comes from, summary lines with the image sizes,
    leaks one a line (exact ones and those across classes first, at most ``max_leaks``: the JSON has them
    all), bad files."""
    counts: dict[str, dict[str, int]] = report["counts"]
    present = {s for per in counts.values() for s in per}
    splits = [s for s in SPLIT_ORDER if s in present] + sorted(present - set(SPLIT_ORDER))
    width = max([5, *(len(c) for c in counts)])
    lines = ["class".ljust(width) + "".join(f"{s:>7}" for s in splits) + f"{'total':>7}"]
    for label, per in counts.items():
        lines.append(
            label.ljust(width) + "".join(f"{per.get(s, 0):>7}" for s in splits) + f"{sum(per.values()):>7}"
        )
    totals = [sum(per.get(s, 0) for per in counts.values()) for s in splits]
    lines.append("total".ljust(width) + "".join(f"{t:>7}" for t in totals) + f"{sum(totals):>7}")
    lines.append("")
    if "split" in report:
        lines.append(_split_line(report["split"]))
    lines.extend(report["summary"][:1])
    lines.append(_sizes_line(report["size_distribution"]))
    lines.extend(report["summary"][1:])
    if report["leaks"]:
        lines.append("leaks:")
        ranked = sorted(report["leaks"], key=lambda x: (x["kind"] != "exact", "class" not in x["cross"]))
        for x in ranked[:max_leaks]:
            dist = "" if x["kind"] == "exact" else f" d={x['distance']}"
            lines.append(
                f"  {x['kind']}{dist}: {x['a']} ({x['a_class']}/{x['a_split'] or '-'}) ~ "
                f"{x['b']} ({x['b_class']}/{x['b_split'] or '-'}) across {'+'.join(x['cross'])}"
            )
        if len(ranked) > max_leaks:
            lines.append(f"  ... and {len(ranked) - max_leaks} more (all of them in the JSON report)")
    if report["bad_files"]:
        lines.append("bad files:")
        lines.extend(f"  {b['path']}: {b['problem']}" for b in report["bad_files"])
    if report.get("unreadable"):
        lines.append("unreadable:")
        lines.extend(f"  {u['id']}: {u['problem']}" for u in report["unreadable"])
    return "\n".join(lines)

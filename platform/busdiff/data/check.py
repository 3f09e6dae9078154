"""The data-quality stage: load a BUSI folder, hash every image (in-process or on Ray), report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from busdiff.config import DataConfig, QualityConfig, SplitConfig
from busdiff.data.busi import load_dataset
from busdiff.data.quality import build_report, hash_image
from busdiff.data.records import DatasetError, ImageRecord
from busdiff.data.splits import assign_splits
from busdiff.storage import write_text


def _hash_rows_on_ray(records: list[ImageRecord], hash_size: int) -> list[dict[str, Any]]:
    """Hash images in parallel as Ray Data tasks; rows carry the record, so workers need no shared state."""
    import ray

    rows = [{"record": json.dumps(r.to_dict())} for r in records]

    def _hash(row: dict[str, Any]) -> dict[str, Any]:
        d = json.loads(row["record"])
        d["mask_paths"] = tuple(d["mask_paths"])
        return {"hash": json.dumps(hash_image(ImageRecord(**d), hash_size))}

    blocks = max(1, min(len(rows) // 16, 64))
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map(_hash)
    return [json.loads(r["hash"]) for r in ds.take_all()]


def stage_split(records: list[ImageRecord], cfg: SplitConfig) -> tuple[list[ImageRecord], dict[str, Any]]:
    """The records with the split fine-tuning, generation and evaluation will use (the data's own, or
    :func:`assign_splits`'s where the data has none, as in the Kaggle layout), and where it comes from:
    ``{"source": "data"}``, ``{"source": "assigned", **cfg}``, or ``{"source": "mixed", "problem": ...}``
    (some records have a split and some not: the stages refuse such data, the check reports it as is)."""
    if all(r.split is not None for r in records):
        return records, {"source": "data"}
    try:
        return assign_splits(records, cfg), {"source": "assigned", **cfg.model_dump()}
    except DatasetError as e:
        return records, {"source": "mixed", "problem": str(e)}


def run_data_check(
    data: DataConfig, quality: QualityConfig, json_out: str | Path | None = None, use_ray: bool = False
) -> dict[str, Any]:
    """Load ``data.root``, hash every image and build the quality report; write it as JSON when asked.

    Counts and leaks are per the split the other stages use (:func:`stage_split`; ``report["split"]``
    says where it comes from). ``use_ray`` hashes on the connected Ray cluster (the caller connects);
    otherwise in this process.
    """
    loaded = load_dataset(data.root, layout=data.layout, skip_bad=data.skip_bad)
    records, split = stage_split(loaded.records, data.split)
    if use_ray:
        hashes = _hash_rows_on_ray(records, quality.hash_size)
    else:
        hashes = [hash_image(r, quality.hash_size) for r in records]
    report = build_report(records, hashes, quality, bad_files=loaded.bad_files)
    report["root"] = str(data.root)
    report["layout"] = loaded.layout
    report["split"] = split
    if json_out is not None:
        write_text(json_out, json.dumps(report, indent=2) + "\n")
    return report

"""The leakage guard: no judged real image may be one the generator (or classifier) was trained on.

The paper's public code trained its adapters on every image and then measured against the same images.
Here every judged real image (the held-out splits, and the val split the classifier selects models on) is
checked against the training pool: the ids the adapters trained on (``trained_ids`` of each
``evaluate.adapters`` folder, and of the corpus's own adapter as its plan.json records it) and the train
split. A judged image is refused when its id is in the pool, or when it is an exact (identical bytes) or
near (perceptual-hash distance within ``quality.near_duplicate_distance``, as in the data-quality report)
duplicate of a pool image. Synthetic images refined from a judged real image (img2img at 0.3 makes
near-copies of its source) are refused too. Refused images are dropped and listed (``leakage: exclude``)
or stop the evaluation (``leakage: error``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from busdiff.config import QualityConfig
from busdiff.data.quality import hash_image, near_pairs
from busdiff.data.records import ImageRecord
from busdiff.evaluate.features import ImageItem
from busdiff.models.adapters import read_adapter_json


class LeakageError(ValueError):
    """Held-out images were seen in training; the message names each one and why."""


@dataclass
class LeakageResult:
    kept: list[ImageRecord]
    refused: list[dict[str, Any]] = field(default_factory=list)
    adapters: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"n_kept": len(self.kept), "refused": self.refused, "adapters": self.adapters}


def adapter_trained_ids(adapter_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One entry per adapter folder (verified adapter.json): ``name``, ``base_model``, ``trained_ids``."""
    out = []
    for d in adapter_dirs:
        meta = read_adapter_json(d)
        out.append({"name": f"adapter {d}", "base_model": meta.get("base_model"),
                    "trained_ids": [str(i) for i in meta.get("trained_ids") or []]})
    return out


def _refuse(listed: list[dict[str, Any]], what: str, mode: str) -> None:
    if listed and mode == "error":
        lines = "\n".join(f"  {x['id']}: {x['kind']}: {x['reason']}" for x in listed)
        raise LeakageError(
            f"{len(listed)} {what}:\n{lines}\n"
            "set evaluate.leakage=exclude to drop them (they are then listed in the report)"
        )


def guard_synthetic(
    synthetic: Sequence[ImageItem], sources: dict[str, dict[str, str]], records: Sequence[ImageRecord],
    judged_splits: Sequence[str], mode: str = "exclude", conditions: dict[str, str] | None = None,
) -> tuple[list[ImageItem], list[dict[str, Any]]]:
    """Synthetic images refined from, or conditioned on the mask of, a real image of ``judged_splits``:
    ``sources`` maps a sample id (the file stem) to its source ``{"record", "sha256"}`` and ``conditions``
    to the record whose mask conditioned it (plan.json); a source is matched to ``records`` by content, or
    by id where no hash was recorded, a condition by id. Returns the kept images and the refused ones."""
    by_sha = {r.sha256: r for r in records if r.sha256}
    by_id = {r.id: r for r in records}
    conditions = conditions or {}
    refused = []
    for it in synthetic:
        stem = Path(it.path).stem
        src = sources.get(stem)
        real = None
        if src:
            real = by_sha.get(src.get("sha256", "")) or (None if src.get("sha256") else
                                                          by_id.get(src["record"]))
        if real is not None and real.split in judged_splits:
            refused.append({"id": it.id, "kind": "refined from a judged image", "match": real.id,
                            "split": real.split,
                            "reason": f"refined from {real.id} of the {real.split} split (plan.json)"})
            continue
        shaped = by_id.get(conditions.get(stem, ""))
        if shaped is not None and shaped.split in judged_splits:
            refused.append({"id": it.id, "kind": "conditioned on a judged image's mask", "match": shaped.id,
                            "split": shaped.split,
                            "reason": f"its lesion mask is {shaped.id}'s, of the {shaped.split} split "
                                      "(plan.json)"})
    _refuse(refused, "synthetic image(s) were made from judged real images", mode)
    gone = {x["id"] for x in refused}
    return [it for it in synthetic if it.id not in gone], refused


def guard_held_out(
    held_out: Sequence[ImageRecord],
    records: Sequence[ImageRecord],
    *,
    train_split: str = "train",
    adapters: Sequence[dict[str, Any]] = (),
    quality: QualityConfig | None = None,
    mode: str = "exclude",
) -> LeakageResult:
    """Check ``held_out`` (the judged real images) against the training pool: the ``trained_ids`` of each of
    ``adapters`` (:func:`adapter_trained_ids`, or a corpus's plan.json) + ``train_split`` of ``records``."""
    quality = quality or QualityConfig()
    by_id = {r.id: r for r in records}
    by_adapter: dict[str, list[str]] = {}
    summary = []
    for a in adapters:
        for i in a["trained_ids"]:
            by_adapter.setdefault(i, []).append(a["name"])
        summary.append({"name": a["name"], "base_model": a.get("base_model"),
                        "n_trained_ids": len(a["trained_ids"]),
                        "n_unknown_ids": sum(i not in by_id for i in a["trained_ids"])})

    def why_pool(rid: str) -> str:
        parts = []
        if rid in by_adapter:
            parts.append("trained on by " + ", ".join(by_adapter[rid]))
        if rid in by_id and by_id[rid].split == train_split:
            parts.append(f"in the {train_split} split")
        return "; ".join(parts)

    pool = [r for r in records if why_pool(r.id)]
    pool_ids = {r.id for r in pool}
    refused: dict[str, dict[str, Any]] = {}
    for r in held_out:
        if r.id in pool_ids:
            refused[r.id] = {"id": r.id, "kind": "same image", "match": r.id, "reason": why_pool(r.id)}

    candidates = [r for r in held_out if r.id not in refused]
    if candidates and pool:
        hashes = {h["id"]: h for h in (hash_image(r, quality.hash_size) for r in [*candidates, *pool])}
        pool_by_sha: dict[str, str] = {}
        for r in pool:
            pool_by_sha.setdefault(hashes[r.id]["sha256"] or r.sha256, r.id)
        for r in candidates:
            other = pool_by_sha.get(hashes[r.id]["sha256"] or r.sha256)
            if other is not None:
                refused[r.id] = {
                    "id": r.id,
                    "kind": "exact duplicate",
                    "match": other,
                    "reason": f"identical bytes to {other} ({why_pool(other)})",
                }
        names = [r.id for r in [*candidates, *pool] if hashes[r.id]["phash"]]
        is_pool = [n in pool_ids for n in names]
        for i, j, dist in near_pairs([hashes[n]["phash"] for n in names], quality.near_duplicate_distance):
            if is_pool[i] == is_pool[j]:
                continue
            held, other = (names[j], names[i]) if is_pool[i] else (names[i], names[j])
            if held not in refused:
                refused[held] = {
                    "id": held,
                    "kind": "near duplicate",
                    "match": other,
                    "distance": int(dist),
                    "reason": f"perceptual-hash distance {dist} <= "
                    f"{quality.near_duplicate_distance} to {other} ({why_pool(other)})",
                }
    split_of = {r.id: r.split for r in held_out}
    listed = sorted(({**x, "split": split_of[x["id"]]} for x in refused.values()), key=lambda x: x["id"])
    _refuse(listed, "judged real image(s) were seen in training", mode)
    return LeakageResult([r for r in held_out if r.id not in refused], listed, summary)

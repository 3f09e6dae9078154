"""The leakage guard: no held-out image may be one the generator (or classifier) was trained on.

The paper's public code trained its adapters on every image and then measured against the same images.
Here every held-out real image is checked against the training pool: the ids in each adapter's
``adapter.json`` (``trained_ids``) and the train split. A held-out image is refused when its id is in the
pool, or when it is an exact (identical bytes) or near (perceptual-hash distance within
``quality.near_duplicate_distance``, as in the data-quality report) duplicate of a pool image. Refused
images are dropped and listed (``leakage: exclude``) or stop the evaluation (``leakage: error``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from busdiff.config import QualityConfig
from busdiff.data.quality import hash_image, near_pairs
from busdiff.data.records import ImageRecord
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


def adapter_trained_ids(adapter_dirs: Sequence[str | Path]) -> tuple[dict[str, list[str]], list[dict]]:
    """``{image id: [adapter dirs that trained on it]}`` and a summary per adapter (verified adapter.json)."""
    seen: dict[str, list[str]] = {}
    summary = []
    for d in adapter_dirs:
        meta = read_adapter_json(d)
        ids = [str(i) for i in meta.get("trained_ids") or []]
        for i in ids:
            seen.setdefault(i, []).append(str(d))
        summary.append({"dir": str(d), "base_model": meta.get("base_model"), "n_trained_ids": len(ids)})
    return seen, summary


def guard_held_out(
    held_out: Sequence[ImageRecord],
    records: Sequence[ImageRecord],
    *,
    train_split: str = "train",
    adapter_dirs: Sequence[str | Path] = (),
    quality: QualityConfig | None = None,
    mode: str = "exclude",
) -> LeakageResult:
    """Check ``held_out`` against the training pool (adapter trained ids + ``train_split`` of ``records``)."""
    quality = quality or QualityConfig()
    by_adapter, summary = adapter_trained_ids(adapter_dirs)
    by_id = {r.id: r for r in records}
    for s in summary:
        ids = [i for i, dirs in by_adapter.items() if s["dir"] in dirs]
        s["n_unknown_ids"] = sum(i not in by_id for i in ids)

    def why_pool(rid: str) -> str:
        parts = []
        if rid in by_adapter:
            parts.append("trained on by adapter " + ", ".join(by_adapter[rid]))
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
    listed = sorted(refused.values(), key=lambda x: x["id"])
    if listed and mode == "error":
        lines = "\n".join(f"  {x['id']}: {x['kind']}: {x['reason']}" for x in listed)
        raise LeakageError(
            f"{len(listed)} held-out image(s) were seen in training:\n{lines}\n"
            "set evaluate.leakage=exclude to drop them from the held-out set "
            "(they are then listed in the report)"
        )
    return LeakageResult([r for r in held_out if r.id not in refused], listed, summary)

"""A deterministic stratified train/val/test split, the same recipe that made busi-256's split.

Per class: records sorted by N (the number in ``<class>_<NNNN>``), ``random.Random(seed).shuffle`` (a fresh
generator per class), the first ``round(train * n)`` go to train, the next ``round(val * n)`` to val, the
rest to test. A Kaggle copy of BUSI therefore gets exactly busi-256's split with the default config.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import replace

from busdiff.config import SplitConfig
from busdiff.data.records import BadFile, DatasetError, ImageRecord

_N = re.compile(r"_(\d+)$")


def _order_key(record: ImageRecord) -> tuple[int, int, str]:
    """Sort by N when the id ends in ``_<digits>``; ids without a number come after, by id."""
    m = _N.search(record.id)
    return (0, int(m.group(1)), record.id) if m else (1, 0, record.id)


def assign_splits(records: list[ImageRecord], cfg: SplitConfig) -> list[ImageRecord]:
    """Give every record a split (stratified by label) when none has one; return them in the input order.

    Records that all have a split already are returned unchanged; a mix raises :class:`DatasetError`.
    """
    records = list(records)
    with_split = [r for r in records if r.split is not None]
    if len(with_split) == len(records):
        return records
    if with_split:
        without = [r for r in records if r.split is None]
        shown = ", ".join(r.id for r in without[:10]) + (" ..." if len(without) > 10 else "")
        raise DatasetError(
            BadFile(
                "<split>",
                f"{len(with_split)} record(s) have a split and {len(without)} do not ({shown}); "
                "give every record a split or none",
            )
        )
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dups = sorted(i for i, c in Counter(ids).items() if c > 1)
        raise DatasetError(BadFile("<split>", f"duplicate record id(s): {', '.join(dups[:10])}"))

    split_of: dict[str, str] = {}
    for label in sorted({r.label for r in records}):
        members = sorted((r for r in records if r.label == label), key=_order_key)
        n = len(members)
        order = list(range(n))
        random.Random(cfg.seed).shuffle(order)
        n_train = min(n, round(cfg.train * n))
        n_val = min(n - n_train, round(cfg.val * n))
        for rank, idx in enumerate(order):
            name = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            split_of[members[idx].id] = name
    return [replace(r, split=split_of[r.id]) for r in records]


def split_counts(records: list[ImageRecord]) -> dict[str, dict[str, int]]:
    """``{label: {split: n}}`` (split ``"none"`` for records without one)."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        per = out.setdefault(r.label, {})
        key = r.split or "none"
        per[key] = per.get(key, 0) + 1
    return out

"""busdiff.data.splits: deterministic, stratified, keeps existing splits, and reproduces busi-256's split."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from busdiff.config import SplitConfig
from busdiff.data.busi import load_dataset
from busdiff.data.records import DatasetError, ImageRecord
from busdiff.data.splits import assign_splits, split_counts

from .kaggle_fixture import make_kaggle


def _records(n_per_class: dict[str, int]) -> list[ImageRecord]:
    return [
        ImageRecord(id=f"{label}_{i:04d}", image_path=f"/nowhere/{label}_{i}.png", label=label)
        for label, n in n_per_class.items()
        for i in range(1, n + 1)
    ]


SIZES = {"benign": 437, "malignant": 210, "normal": 133}


def test_stratified_counts_follow_the_fractions_per_class():
    out = assign_splits(_records(SIZES), SplitConfig())
    assert split_counts(out) == {
        "benign": {"train": 306, "val": 66, "test": 65},
        "malignant": {"train": 147, "val": 32, "test": 31},
        "normal": {"train": 93, "val": 20, "test": 20},
    }
    out = assign_splits(_records({"benign": 40, "normal": 10}), SplitConfig(train=0.5, val=0.25, test=0.25))
    c = split_counts(out)
    assert c["benign"] == {"train": 20, "val": 10, "test": 10}
    assert Counter(c["normal"]) == Counter({"train": 5, "val": 2, "test": 3})  # round(2.5) == 2


def test_no_val_when_val_fraction_is_zero():
    out = assign_splits(_records({"benign": 20}), SplitConfig(train=0.8, val=0.0, test=0.2))
    assert split_counts(out) == {"benign": {"train": 16, "test": 4}}


def test_deterministic_and_independent_of_input_order():
    recs = _records(SIZES)
    a = assign_splits(recs, SplitConfig())
    shuffled = recs[:]
    random.Random(5).shuffle(shuffled)
    b = assign_splits(shuffled, SplitConfig())
    assert [r.id for r in b] == [r.id for r in shuffled]  # input order kept
    assert {r.id: r.split for r in a} == {r.id: r.split for r in b}
    assert assign_splits(recs, SplitConfig()) == a


def test_other_classes_do_not_change_a_class_split():
    alone = assign_splits(_records({"malignant": 210}), SplitConfig())
    together = {r.id: r.split for r in assign_splits(_records(SIZES), SplitConfig())}
    assert all(together[r.id] == r.split for r in alone)


def test_seed_changes_the_split_but_not_the_counts():
    a = assign_splits(_records(SIZES), SplitConfig(seed=0))
    b = assign_splits(_records(SIZES), SplitConfig(seed=1))
    assert [r.split for r in a] != [r.split for r in b]
    assert split_counts(a) == split_counts(b)


def test_order_is_by_number_not_by_string():
    """N=10000 sorts after N=9999, as 'sorted by N' says (string order would put it first)."""
    recs = [ImageRecord(id=f"benign_{n:04d}", image_path="", label="benign") for n in (2, 9999, 10000, 7, 30)]
    order = list(range(5))
    random.Random(0).shuffle(order)
    by_n = sorted(recs, key=lambda r: int(r.id.split("_")[1]))
    names = {by_n[i].id: ("train" if k < 4 else "val" if k < 5 else "test") for k, i in enumerate(order)}
    # round(0.7*5)=4 train, round(0.15*5)=1 val, 0 test
    assert {r.id: r.split for r in assign_splits(recs, SplitConfig())} == names


def test_existing_splits_are_kept():
    recs = [replace(r, split=("test" if i % 3 else "train")) for i, r in enumerate(_records(SIZES))]
    assert assign_splits(recs, SplitConfig(seed=3)) == recs
    assert assign_splits([], SplitConfig()) == []


def test_a_mix_of_split_and_unsplit_raises():
    recs = _records({"benign": 5})
    recs[2] = replace(recs[2], split="train")
    with pytest.raises(DatasetError, match="1 record.*have a split and 4 do not.*benign_0001"):
        assign_splits(recs, SplitConfig())


def test_duplicate_ids_raise():
    recs = _records({"benign": 3}) * 2
    with pytest.raises(DatasetError, match="duplicate record id"):
        assign_splits(recs, SplitConfig())


def test_kaggle_fixture_gets_a_split_for_every_record(tmp_path):
    make_kaggle(tmp_path)
    recs = load_dataset(tmp_path).records
    out = assign_splits(recs, SplitConfig())
    assert all(r.split in ("train", "val", "test") for r in out)
    assert [replace(r, split=None) for r in out] == recs


def test_busi256_split_is_reproduced_from_scratch(busi256):
    recs = load_dataset(busi256).records
    assert all(r.split for r in recs)
    resplit = assign_splits([replace(r, split=None) for r in recs], SplitConfig())
    mismatched = [r.id for r, s in zip(recs, resplit, strict=True) if r.split != s.split]
    assert mismatched == []

"""busdiff.data.quality: per-image hashes, the pure reducer, duplicates, leaks, masks, and busi-256."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace

import numpy as np
import pytest

from busdiff.config import QualityConfig
from busdiff.data.busi import load_dataset
from busdiff.data.quality import build_report, check_dataset, format_report, hash_image, near_pairs
from busdiff.data.records import ImageRecord

from .kaggle_fixture import make_kaggle

CFG = QualityConfig()


@pytest.fixture
def kaggle(tmp_path):
    return make_kaggle(tmp_path)


@pytest.fixture
def loaded(kaggle):
    return load_dataset(kaggle.root).records


def _with_splits(records: list[ImageRecord], splits: dict[str, str]) -> list[ImageRecord]:
    return [replace(r, split=splits.get(r.id, "train")) for r in records]


# ---------------------------------------------------------------- hash_image


def test_hash_image_fields(kaggle, loaded):
    for r in loaded:
        h = hash_image(r)
        assert set(h) == {"id", "sha256", "phash", "width", "height", "mask_pixels", "problem"}
        assert h["id"] == r.id and h["sha256"] == r.sha256 and h["problem"] is None
        assert (h["width"], h["height"]) == kaggle.sizes[r.id]
        assert isinstance(h["phash"], str) and len(h["phash"]) == 16
        int(h["phash"], 16)
        assert h["mask_pixels"] == int(kaggle.masks[r.id].sum())
        json.dumps(h)
    assert len(hash_image(loaded[0], hash_size=16)["phash"]) == 64


def test_hash_image_without_mask_and_unreadable(kaggle, loaded):
    r = loaded[0]
    assert hash_image(replace(r, mask_paths=()))["mask_pixels"] == -1
    kaggle.image(r.id).write_bytes(b"broken")
    h = hash_image(r)
    assert h["phash"] is None and "cannot decode image" in h["problem"] and r.image_path in h["problem"]


# ---------------------------------------------------------------- near_pairs (vectorised)


def test_near_pairs_matches_brute_force():
    rng = random.Random(7)
    bases = [rng.getrandbits(64) for _ in range(15)]
    values = []
    for _ in range(300):
        v = rng.choice(bases)
        for _ in range(rng.randint(0, 9)):
            v ^= 1 << rng.randrange(64)
        values.append(v)
    hexes = [f"{v:016x}" for v in values]
    want = {
        (i, j, (values[i] ^ values[j]).bit_count())
        for i in range(len(values))
        for j in range(i + 1, len(values))
        if (values[i] ^ values[j]).bit_count() <= 6
    }
    got = near_pairs(hexes, 6)
    assert len(got) == len(want) > 100 and set(got) == want
    assert near_pairs(hexes[:1], 6) == [] and near_pairs([], 6) == []
    # odd bit counts (hash_size 5 -> 25 bits, 7 hex digits)
    assert near_pairs(["1ffffff", "0ffffff", "0000000"], 1) == [(0, 1, 1)]
    with pytest.raises(ValueError, match="different lengths"):
        near_pairs(["ab", "abc"], 3)


# ---------------------------------------------------------------- build_report on the Kaggle fixture


def test_report_on_unsplit_kaggle_fixture(kaggle, loaded):
    rep = check_dataset(loaded, CFG)
    json.dumps(rep)
    assert rep["n_images"] == len(kaggle.ids)
    assert rep["counts"] == {"benign": {"none": 5}, "malignant": {"none": 2}, "normal": {"none": 2}}
    assert rep["exact_duplicates"] == [list(kaggle.exact_pair)]
    assert [(p["a"], p["b"]) for p in rep["near_duplicates"]] == [kaggle.near_pair]
    assert 0 < rep["near_duplicates"][0]["distance"] <= CFG.near_duplicate_distance
    # unsplit: only the exact pair is a leak (across class); the near pair is one class
    assert rep["leaks"] == [
        {
            "a": "benign_0003",
            "b": "malignant_0001",
            "kind": "exact",
            "distance": 0,
            "cross": ["class"],
            "a_class": "benign",
            "b_class": "malignant",
            "a_split": None,
            "b_split": None,
        }
    ]
    assert rep["empty_masks"] == kaggle.empty_lesion_masks
    assert rep["images_without_mask"] == [] and rep["masks_without_image"] == [] and rep["bad_files"] == []
    sd = rep["size_distribution"]
    assert sd["width"] == {"min": 50, "median": 64, "max": 96}
    assert sd["height"] == {"min": 40, "median": 60, "max": 72}
    assert sd["common_sizes"][:2] == [
        {"width": 64, "height": 48, "count": 2},
        {"width": 72, "height": 72, "count": 2},
    ]
    assert sd["n_distinct"] == 7
    assert set(rep["timings"]) == {"hash_s", "report_s"}


def test_leaks_across_split_and_class(loaded):
    recs = _with_splits(
        loaded,
        {"benign_0001": "train", "benign_0004": "test", "benign_0003": "val", "malignant_0001": "test"},
    )
    rep = check_dataset(recs, CFG)
    leaks = {(x["a"], x["b"]): x for x in rep["leaks"]}
    assert set(leaks) == {("benign_0001", "benign_0004"), ("benign_0003", "malignant_0001")}
    near = leaks[("benign_0001", "benign_0004")]
    assert near["kind"] == "near" and near["cross"] == ["split"]
    assert (near["a_split"], near["b_split"]) == ("train", "test")
    exact = leaks[("benign_0003", "malignant_0001")]
    assert exact["kind"] == "exact" and exact["cross"] == ["class", "split"]
    assert rep["counts"]["benign"] == {"train": 3, "val": 1, "test": 1}
    # same split on both sides: the near pair is no leak any more, the exact pair stays one (class)
    same = check_dataset(_with_splits(loaded, {}), CFG)
    assert [(x["a"], x["b"], x["cross"]) for x in same["leaks"]] == [
        ("benign_0003", "malignant_0001", ["class"])
    ]


def test_near_duplicate_threshold_is_honoured(loaded):
    hashes = [hash_image(r) for r in loaded]
    d = build_report(loaded, hashes, CFG)["near_duplicates"][0]["distance"]
    assert build_report(loaded, hashes, QualityConfig(near_duplicate_distance=d - 1))["near_duplicates"] == []
    # the exact pair is never also listed as a near pair
    many = build_report(loaded, hashes, QualityConfig(near_duplicate_distance=64))["near_duplicates"]
    n = len(loaded)
    assert len(many) == n * (n - 1) // 2 - 1
    assert {"a": "benign_0003", "b": "malignant_0001"} not in [{"a": p["a"], "b": p["b"]} for p in many]


def test_build_report_is_a_pure_reducer(loaded):
    hashes = [hash_image(r) for r in loaded]
    a = build_report(loaded, hashes, CFG)
    b = build_report(list(reversed(loaded)), json.loads(json.dumps(hashes[::-1])), CFG)
    assert a == b
    with pytest.raises(ValueError, match="no hash for 1 record"):
        build_report(loaded, hashes[1:], CFG)


def test_bad_files_feed_the_report(kaggle):
    kaggle.image("malignant_0002").unlink()
    kaggle.mask("normal_0001").unlink()
    kaggle.image("benign_0002").write_bytes(b"junk")
    res = load_dataset(kaggle.root, skip_bad=True)
    rep = check_dataset(res.records, CFG, res.bad_files)
    assert [p.rsplit("/", 1)[1] for p in rep["masks_without_image"]] == ["malignant (2)_mask.png"]
    assert [p.rsplit("/", 1)[1] for p in rep["images_without_mask"]] == ["normal (1).png"]
    assert sorted(b["path"].rsplit("/", 1)[1] for b in rep["bad_files"]) == [
        "benign (2).png",
        "malignant (2)_mask.png",
        "normal (1).png",
    ]
    assert all(set(b) >= {"path", "problem"} for b in rep["bad_files"])
    # dicts (e.g. back from a Ray task) work as well as BadFile objects
    hashes = [hash_image(r) for r in res.records]
    as_dicts = [b.to_dict() for b in res.bad_files]
    assert build_report(res.records, hashes, CFG, as_dicts) == build_report(
        res.records, hashes, CFG, res.bad_files
    )
    assert any("3 bad file(s)" in line for line in rep["summary"])


def test_record_without_mask_and_unreadable_image_are_reported(kaggle, loaded):
    recs = [replace(r, mask_paths=()) if r.id == "normal_0002" else r for r in loaded]
    kaggle.image("malignant_0002").write_bytes(b"broken after loading")
    rep = check_dataset(recs, CFG)
    assert rep["images_without_mask"] == [str(kaggle.image("normal_0002").resolve())]
    assert [u["id"] for u in rep["unreadable"]] == ["malignant_0002"]
    assert "normal_0002" not in rep["empty_masks"]
    assert "malignant_0002" not in [p["a"] for p in rep["near_duplicates"]]


def test_normal_with_a_lesion_mask_is_flagged(kaggle, loaded):
    from .kaggle_fixture import save_mask

    fg = np.zeros((56, 56), dtype=bool)
    fg[5:9, 5:9] = True
    save_mask(fg, kaggle.mask("normal_0001"), "L")
    assert check_dataset(loaded, CFG)["normal_with_mask"] == ["normal_0001"]


def test_format_report(loaded):
    recs = _with_splits(loaded, {"benign_0001": "train", "benign_0004": "test", "malignant_0001": "test"})
    text = format_report(check_dataset(recs, CFG))
    lines = text.splitlines()
    assert lines[0].split() == ["class", "train", "test", "total"]
    assert lines[1].split() == ["benign", "4", "1", "5"]
    assert lines[4].split() == ["total", "7", "2", "9"]
    assert "1 exact duplicate pair(s)" in text and "1 near-duplicate pair(s)" in text
    leak_lines = [ln for ln in lines if ln.startswith("  exact") or ln.startswith("  near")]
    assert len(leak_lines) == 2
    assert any("benign_0003" in ln and "malignant_0001" in ln and "class+split" in ln for ln in leak_lines)
    assert any("benign_0001" in ln and "benign_0004" in ln and "split" in ln for ln in leak_lines)


# ---------------------------------------------------------------- the real busi-256


@pytest.fixture(scope="module")
def busi_report(busi256):
    res = load_dataset(busi256)
    t0 = time.perf_counter()
    hashes = [hash_image(r, CFG.hash_size) for r in res.records]
    t1 = time.perf_counter()
    report = build_report(res.records, hashes, CFG, res.bad_files)
    t2 = time.perf_counter()
    return res.records, hashes, report, {"hash_s": t1 - t0, "report_s": t2 - t1}


def test_busi256_exact_duplicate_is_a_leak_across_class_and_split(busi_report):
    _, _, rep, _ = busi_report
    json.dumps(rep)
    assert ["benign_0433", "malignant_0145"] in rep["exact_duplicates"]
    leak = next(x for x in rep["leaks"] if (x["a"], x["b"]) == ("benign_0433", "malignant_0145"))
    assert leak["kind"] == "exact" and leak["cross"] == ["class", "split"]
    assert (leak["a_split"], leak["b_split"]) == ("test", "train")
    assert "benign_0433" in format_report(rep)


def test_busi256_empty_masks_and_counts(busi_report):
    _, _, rep, _ = busi_report
    assert {"benign_0221", "benign_0246"} <= set(rep["empty_masks"])
    assert rep["n_images"] == 780 and rep["bad_files"] == []
    assert rep["counts"]["malignant"] == {"train": 147, "val": 32, "test": 31}
    assert rep["size_distribution"]["common_sizes"] == [{"width": 256, "height": 256, "count": 780}]


def test_busi256_reducer_is_fast(busi_report):
    records, hashes, _, timings = busi_report
    t0 = time.perf_counter()
    build_report(records, hashes, CFG)
    assert time.perf_counter() - t0 < 1.0
    assert timings["report_s"] < 1.0

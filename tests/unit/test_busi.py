"""busdiff.data.busi: both layouts, mask union, every bad-input case, skip_bad, and the real busi-256."""

from __future__ import annotations

import csv
import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busdiff.data import busi
from busdiff.data.busi import load_dataset, read_image, read_mask, sha256_file
from busdiff.data.records import DatasetError, ImageRecord

from .kaggle_fixture import make_kaggle, make_manifest, save_mask, smooth_image, write_manifest


@pytest.fixture
def kaggle(tmp_path):
    return make_kaggle(tmp_path / "download")


@pytest.fixture
def manifest(tmp_path):
    return make_manifest(tmp_path / "m")


# ---------------------------------------------------------------- kaggle layout


@pytest.mark.parametrize("where", ["parent", "base"])
def test_kaggle_layout_reads_every_image_with_ids_sizes_and_sha(kaggle, where):
    root = kaggle.root if where == "parent" else kaggle.base
    res = load_dataset(root)
    assert res.layout == "kaggle"
    assert res.bad_files == []
    assert [r.id for r in res.records] == kaggle.ids
    assert [(r.label, r.id) for r in res.records] == sorted((r.label, r.id) for r in res.records)
    for r in res.records:
        assert r.split is None
        assert r.label == r.id.rsplit("_", 1)[0]
        assert (r.width, r.height) == kaggle.sizes[r.id]
        assert r.sha256 == hashlib.sha256(Path(r.image_path).read_bytes()).hexdigest()
        assert Path(r.image_path) == kaggle.image(r.id).resolve()
        assert Path(r.image_path).is_absolute()
    by_id = {r.id: r for r in res.records}
    # N=10 becomes 0010, and the extra _mask_1 is listed after _mask
    assert "benign_0010" in by_id
    assert [Path(p).name for p in by_id["benign_0002"].mask_paths] == [
        "benign (2)_mask.png",
        "benign (2)_mask_1.png",
    ]
    assert by_id["benign_0003"].sha256 == by_id["malignant_0001"].sha256


def test_kaggle_explicit_layout_and_auto_agree(kaggle):
    assert load_dataset(kaggle.root, layout="kaggle").records == load_dataset(kaggle.root).records


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"busi" * 100_000)
    assert sha256_file(p) == hashlib.sha256(b"busi" * 100_000).hexdigest()
    assert sha256_file(str(p)) == sha256_file(p)


# ---------------------------------------------------------------- masks and images


def test_read_mask_is_the_union_of_all_mask_files_of_any_mode(kaggle):
    res = load_dataset(kaggle.root)
    for r in res.records:
        m = read_mask(r)
        assert m.dtype == np.uint8
        assert m.shape == (r.height, r.width)
        assert set(np.unique(m).tolist()) <= {0, 255}
        np.testing.assert_array_equal(m > 0, kaggle.masks[r.id], err_msg=r.id)
    two = next(r for r in res.records if r.id == "benign_0002")
    only_first = read_mask(ImageRecord(**{**two.to_dict(), "mask_paths": two.mask_paths[:1]}))
    assert (read_mask(two) > 0).sum() > (only_first > 0).sum() > 0


def test_read_mask_resizes_and_handles_no_mask(kaggle):
    r = next(r for r in load_dataset(kaggle.root).records if r.id == "benign_0001")
    small = read_mask(r, size=(32, 24))
    assert small.shape == (24, 32)
    np.testing.assert_array_equal(small > 0, kaggle.masks["benign_0001"][1::2, 1::2])  # PIL samples centres
    bare = ImageRecord(id=r.id, image_path=r.image_path, label=r.label)  # no masks, no size
    z = read_mask(bare)
    assert z.shape == (48, 64) and z.dtype == np.uint8 and not z.any()
    assert read_mask(bare, size=(10, 5)).shape == (5, 10)


def test_read_mask_palette_and_transparent_rgba(tmp_path):
    fg = np.zeros((8, 8), dtype=bool)
    fg[2:4, 2:6] = True
    img = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(img)
    pal = Image.fromarray(fg.astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.save(tmp_path / "p.png")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only the lesion is opaque
    rgba[..., 3] = np.where(fg.T, 255, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rec = ImageRecord("benign_0001", str(img), "benign", (str(tmp_path / "p.png"),), width=8, height=8)
    np.testing.assert_array_equal(read_mask(rec) > 0, fg)
    rec = ImageRecord("benign_0001", str(img), "benign", (str(tmp_path / "a.png"),), width=8, height=8)
    np.testing.assert_array_equal(read_mask(rec) > 0, fg.T)


def test_read_image_is_rgb_of_the_image_size(kaggle, manifest):
    for root in (kaggle.root, manifest.root):
        for r in load_dataset(root).records:
            im = read_image(r)
            assert im.mode == "RGB" and im.size == (r.width, r.height)


# ---------------------------------------------------------------- manifest layout


def test_manifest_layout_keeps_split_and_uses_file_stem_ids(manifest):
    res = load_dataset(manifest.root)
    assert res.layout == "manifest"
    want = sorted((row["label"], Path(row["file"]).stem, row["split"]) for row in manifest.rows)
    assert [(r.label, r.id, r.split) for r in res.records] == want
    for r in res.records:
        assert (r.width, r.height) == (32, 32)
        assert r.sha256 == sha256_file(r.image_path)
        assert len(r.mask_paths) == 1 and Path(r.mask_paths[0]).is_file()


def test_manifest_without_split_gives_none(tmp_path):
    fx = make_manifest(tmp_path, splits=False)
    assert {r.split for r in load_dataset(fx.root, layout="manifest").records} == {None}


def test_auto_prefers_manifest_over_kaggle_folders(tmp_path):
    fx = make_manifest(tmp_path)
    make_kaggle(tmp_path)  # a Dataset_BUSI_with_GT beside manifest.csv
    assert load_dataset(fx.root).layout == "manifest"
    assert load_dataset(fx.root, layout="kaggle").layout == "kaggle"


# ---------------------------------------------------------------- bad input


def _raises(root, *needles, **kw) -> DatasetError:
    with pytest.raises(DatasetError) as ei:
        load_dataset(root, **kw)
    msg = str(ei.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in:\n{msg}"
    return ei.value


def test_missing_root_says_what_a_root_must_be(tmp_path):
    err = _raises(tmp_path / "nope", "nope", "does not exist", "Kaggle", "manifest")
    assert err.bad[0].kind == busi.MISSING_ROOT
    f = tmp_path / "file.txt"
    f.write_text("x")
    _raises(f, "file.txt", "not a folder")


def test_unknown_layout(kaggle):
    _raises(kaggle.root, "'zip'", "auto, kaggle, manifest", layout="zip")


def test_corrupt_image_is_named(kaggle):
    kaggle.image("benign_0002").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    err = _raises(kaggle.root, "benign (2).png", "cannot decode image")
    assert [b.kind for b in err.bad] == [busi.UNREADABLE_IMAGE]


def test_truncated_image_is_named(kaggle):
    p = kaggle.image("normal_0001")
    p.write_bytes(p.read_bytes()[:-200])
    _raises(kaggle.root, "normal (1).png", "cannot decode image")


def test_empty_image_file_is_named(kaggle):
    kaggle.image("malignant_0002").write_bytes(b"")
    _raises(kaggle.root, "malignant (2).png", "empty file")


def test_corrupt_mask_is_named(kaggle):
    kaggle.mask("benign_0002", 1).write_bytes(b"garbage")
    err = _raises(kaggle.root, "benign (2)_mask_1.png", "cannot decode mask")
    assert err.bad[0].kind == busi.UNREADABLE_MASK


def test_mask_of_other_size_is_named(kaggle):
    save_mask(np.ones((10, 10), dtype=bool), kaggle.mask("benign_0001"), "L")
    _raises(kaggle.root, "benign (1)_mask.png", "10x10", "64x48")


def test_mask_without_image_is_named(kaggle):
    kaggle.image("malignant_0002").unlink()
    err = _raises(kaggle.root, "malignant (2)_mask.png", "mask without image", "malignant (2).png")
    assert err.bad[0].kind == busi.MASK_WITHOUT_IMAGE


def test_image_without_mask_is_named(kaggle):
    kaggle.mask("normal_0002").unlink()
    err = _raises(kaggle.root, "normal (2).png", "image without mask", "normal (2)_mask.png")
    assert err.bad[0].kind == busi.IMAGE_WITHOUT_MASK


def test_unknown_class_folder_lists_allowed_classes(kaggle):
    (kaggle.base / "Benign_extra").mkdir()
    err = _raises(kaggle.root, "Benign_extra", "unknown class folder", "benign, malignant, normal")
    assert err.bad[0].kind == busi.UNKNOWN_CLASS


@pytest.mark.parametrize(
    "name",
    ["benign 5.png", "benign (5).jpg", "benign (x).png", "benign (5)_mask_a.png", "malignant (9).png"],
)
def test_bad_file_names_are_named(kaggle, name):
    smooth_image(0, 10, 10).save(kaggle.base / "benign" / name, format="PNG")
    err = _raises(kaggle.root, name)
    assert [b.kind for b in err.bad] == [busi.BAD_NAME]


def test_stray_file_beside_class_folders(kaggle):
    (kaggle.base / "notes.txt").write_text("hi")
    (kaggle.base / ".DS_Store").write_text("ignored")
    _raises(kaggle.root, "notes.txt", "outside the class folders")


def test_two_files_with_one_id(kaggle):
    smooth_image(0, 64, 48).save(kaggle.base / "benign" / "benign (01).png")
    _raises(kaggle.root, "benign (01).png", "benign_0001")


@pytest.mark.parametrize("content", ["empty_classes", "no_classes"])
def test_empty_dataset(tmp_path, content):
    base = tmp_path / "Dataset_BUSI_with_GT"
    base.mkdir()
    if content == "empty_classes":
        for c in ("benign", "malignant", "normal"):
            (base / c).mkdir()
        _raises(tmp_path, "Dataset_BUSI_with_GT", "empty dataset")
    else:
        _raises(tmp_path, "Dataset_BUSI_with_GT", "no class folder")


def test_all_bad_with_skip_bad_still_raises(kaggle):
    for rid in kaggle.ids:
        for p in kaggle.base.glob(f"{rid.split('_')[0]}/*_mask*.png"):
            p.unlink()
    err = _raises(kaggle.root, "empty dataset", "image without mask", skip_bad=True)
    assert len([b for b in err.bad if b.kind == busi.IMAGE_WITHOUT_MASK]) == len(kaggle.ids)


def _break_three(kaggle) -> dict[str, str]:
    """Three different problems; returns {file name: kind}."""
    kaggle.image("benign_0002").write_bytes(b"junk")
    kaggle.image("malignant_0002").unlink()
    kaggle.mask("normal_0001").unlink()
    return {
        "benign (2).png": busi.UNREADABLE_IMAGE,
        "malignant (2)_mask.png": busi.MASK_WITHOUT_IMAGE,
        "normal (1).png": busi.IMAGE_WITHOUT_MASK,
    }


def test_every_problem_is_listed_in_one_error(kaggle):
    broken = _break_three(kaggle)
    err = _raises(kaggle.root, *broken, "skip_bad")
    assert {Path(b.path).name: b.kind for b in err.bad} == broken


def test_skip_bad_leaves_bad_files_out_and_lists_them(kaggle):
    broken = _break_three(kaggle)
    res = load_dataset(kaggle.root, skip_bad=True)
    assert {Path(b.path).name: b.kind for b in res.bad_files} == broken
    assert [r.id for r in res.records] == [
        i for i in kaggle.ids if i not in ("benign_0002", "malignant_0002", "normal_0001")
    ]
    assert all(b.problem and b.to_dict()["path"] == b.path for b in res.bad_files)


def test_manifest_row_with_missing_file_is_named(manifest):
    (manifest.root / manifest.rows[1]["file"]).unlink()
    (manifest.root / manifest.rows[3]["mask"]).unlink()
    err = _raises(manifest.root, manifest.rows[1]["file"], "line 3", manifest.rows[3]["mask"], "missing")
    assert {b.kind for b in err.bad} == {busi.MISSING_FILE}
    res = load_dataset(manifest.root, skip_bad=True)
    assert len(res.records) == len(manifest.rows) - 2 and len(res.bad_files) == 2


def test_manifest_sha256_is_checked(manifest):
    rows = [dict(r) for r in manifest.rows]
    rows[0]["sha256"] = "0" * 64
    write_manifest(manifest.root, rows)
    err = _raises(manifest.root, rows[0]["file"], "sha256", "0" * 64)
    assert err.bad[0].kind == busi.SHA256_MISMATCH


def test_manifest_corrupt_image_unknown_label_and_empty_mask(manifest):
    rows = [dict(r) for r in manifest.rows]
    (manifest.root / rows[0]["file"]).write_bytes(b"nope")
    rows[0]["sha256"] = ""
    rows[2]["label"] = "cyst"
    rows[4]["mask"] = ""
    write_manifest(manifest.root, rows)
    err = _raises(
        manifest.root, rows[0]["file"], "cannot decode", "'cyst'", "benign, malignant", rows[4]["file"]
    )
    assert [b.kind for b in err.bad] == [busi.UNREADABLE_IMAGE, busi.UNKNOWN_CLASS, busi.IMAGE_WITHOUT_MASK]


def test_manifest_missing_columns(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label\na.png,benign\n")
    _raises(tmp_path, "manifest.csv", "missing column", "file", "mask")


def test_manifest_layout_requested_without_manifest(kaggle):
    _raises(kaggle.root, "manifest.csv", "missing", layout="manifest")


def test_empty_manifest(tmp_path):
    (tmp_path / "manifest.csv").write_text("file,mask,label\n")
    _raises(tmp_path, "empty dataset")


# ---------------------------------------------------------------- the real busi-256


@pytest.fixture(scope="module")
def busi_loaded(busi256):
    t0 = time.perf_counter()
    res = load_dataset(busi256)
    return res, time.perf_counter() - t0


def test_busi256_loads_fast_and_matches_its_manifest(busi256, busi_loaded):
    res, seconds = busi_loaded
    assert seconds < 5, f"loading busi-256 took {seconds:.2f}s"
    assert res.layout == "manifest" and res.bad_files == []
    assert len(res.records) == 780
    with open(busi256 / "manifest.csv", newline="") as f:
        rows = {Path(r["file"]).stem: r for r in csv.DictReader(f)}
    assert {r.id for r in res.records} == set(rows)
    for r in res.records:
        assert (r.width, r.height) == (256, 256)
        assert r.sha256 == rows[r.id]["sha256"]
        assert r.split == rows[r.id]["split"] and r.label == rows[r.id]["label"]
    counts = {(lab, s): 0 for lab in ("benign", "malignant", "normal") for s in ("train", "val", "test")}
    for r in res.records:
        counts[(r.label, r.split)] += 1
    assert counts == {
        ("benign", "train"): 306, ("benign", "val"): 66, ("benign", "test"): 65,
        ("malignant", "train"): 147, ("malignant", "val"): 32, ("malignant", "test"): 31,
        ("normal", "train"): 93, ("normal", "val"): 20, ("normal", "test"): 20,
    }  # fmt: skip


def test_busi256_masks(busi_loaded):
    by_id = {r.id: r for r in busi_loaded[0].records}
    for rid in ("benign_0221", "benign_0246", "normal_0001"):
        assert not read_mask(by_id[rid]).any(), rid
    m = read_mask(by_id["benign_0001"])
    assert m.shape == (256, 256) and set(np.unique(m).tolist()) == {0, 255}

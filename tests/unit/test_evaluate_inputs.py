"""What evaluation reads: synthetic folders in the sink's layout, BUSI splits, plain folders; bad input."""

from __future__ import annotations

import pytest
from PIL import Image

from busdiff.evaluate.inputs import InputError, image_set, read_synthetic
from tests.unit.evaluate_fixture import real_phantom, synthetic_folder


def test_synthetic_folder_is_read_per_class_and_other_files_ignored(tmp_path):
    root = synthetic_folder(tmp_path / "samples", 2)
    (root / "metadata.parquet").write_bytes(b"PAR1")  # the generation sink's metadata beside the images
    (root / "_shards").mkdir()  # a folder without images is not a class
    items = read_synthetic(root)
    assert [it.label for it in items] == ["benign"] * 2 + ["malignant"] * 2 + ["normal"] * 2
    assert items[0].id == "benign/syn_benign_0001" and items[0].source == "synthetic"
    # evaluating some classes only: the other class folders are left alone
    assert {it.label for it in read_synthetic(root, ["benign", "normal"])} == {"benign", "normal"}


def test_synthetic_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_synthetic(tmp_path / "nowhere")
    (tmp_path / "empty" / "benign").mkdir(parents=True)
    with pytest.raises(InputError, match="holds no images"):
        read_synthetic(tmp_path / "empty")
    stray = tmp_path / "stray"
    stray.mkdir()
    Image.new("L", (8, 8)).save(stray / "x.png")
    with pytest.raises(InputError, match="outside class folders"):
        read_synthetic(stray)
    unknown = tmp_path / "unknown" / "cyst"
    unknown.mkdir(parents=True)
    Image.new("L", (8, 8)).save(unknown / "x.png")
    with pytest.raises(InputError, match="unknown class folder 'cyst'; allowed: benign, malignant, normal"):
        read_synthetic(tmp_path / "unknown")


def test_image_sets_for_busdiff_fid(tmp_path):
    real = real_phantom(tmp_path / "busi", 8)
    test_items, what = image_set(real, ["test"])
    assert "split test" in what and {it.label for it in test_items} == {"benign", "malignant", "normal"}
    assert not any("_mask" in it.path for it in image_set(real)[0])  # a BUSI folder: images only
    benign, _ = image_set(real, None, "benign")
    assert len(benign) == 8
    plain, what = image_set(synthetic_folder(tmp_path / "syn", 2))
    assert len(plain) == 6 and what.startswith("image folder")
    with pytest.raises(InputError, match="has no splits"):
        image_set(tmp_path / "syn", ["test"])
    with pytest.raises(InputError, match="no images selected"):
        image_set(real, ["holdout"])
    (tmp_path / "void").mkdir()
    with pytest.raises(InputError, match="no images found"):
        image_set(tmp_path / "void")

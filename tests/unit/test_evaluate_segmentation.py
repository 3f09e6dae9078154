"""The segmentation judge's pieces without Ray: Dice/IoU per lesion class and the normal images' false
positives, pairs read at the judge's size, and a U-Net run that learns phantom lesions and is the same
run again for the same seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from busdiff.config import SegmentationConfig, load_config
from busdiff.data.phantom import write_phantom
from busdiff.evaluate.inputs import real_records, select
from busdiff.evaluate.segmentation import pair_arrays, segmentation_metrics, train_run


def _square(n=16, at=4, side=6):
    m = np.zeros((1, n, n), np.uint8)
    m[0, at:at + side, at:at + side] = 1
    return m


def test_dice_and_iou_per_lesion_class_and_normal_false_positives():
    true = np.stack([_square(), _square(), np.zeros((1, 16, 16), np.uint8), np.zeros((1, 16, 16), np.uint8)])
    half = _square()
    half[0, 4:7] = 0  # half of the square predicted
    pred = np.stack([_square(), half, np.zeros((1, 16, 16), np.uint8), _square(at=0, side=1)])
    m = segmentation_metrics(pred, true, ["benign", "malignant", "normal", "normal"])
    assert m["dice_benign"] == pytest.approx(1.0) and m["iou_benign"] == pytest.approx(1.0)
    assert m["dice_malignant"] == pytest.approx(2 * 18 / (18 + 36))
    assert m["iou_malignant"] == pytest.approx(0.5)
    assert m["dice_lesion"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["normal_false_positive"] == 0.5 and m["n_lesion_images"] == 2


def test_a_run_learns_phantom_lesions_and_repeats_for_its_seed(tmp_path):
    root = tmp_path / "busi"
    write_phantom(root, 20, seed=4, size=64)
    recs = real_records(root)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_x"], arrays[f"{split}_y"] = pair_arrays(select(recs, [split]), 32)
        arrays[f"{split}_labels"] = np.array([r.label for r in select(recs, [split])])
    assert arrays["train_x"].shape[1:] == (1, 32, 32) and set(np.unique(arrays["train_y"])) == {0, 1}
    arrays["syn_x"], arrays["syn_y"] = arrays["train_x"][:0], arrays["train_y"][:0]
    cfg = SegmentationConfig(image_size=32, channels=[8, 16, 32], epochs=20, batch_size=4, lr=1e-2)
    spec = {**cfg.model_dump(include={"channels", "num_res_units", "epochs", "batch_size", "lr", "threshold",
                                      "device"}), "seed": 0, "syn_index": [], "ratio": 0.0}
    first = train_run(spec, arrays)
    assert first["status"] == "ok" and 1 <= first["best_epoch"] <= 20
    assert first["test"]["dice_lesion"] > 0.5, first  # the lesions are found, not the whole picture
    again = train_run(spec, arrays)
    assert again["test"] == first["test"] and again["val_history"] == first["val_history"]


def test_the_judge_is_off_by_default_and_checks_its_size():
    assert load_config(None, []).evaluate.segmentation.enabled is False
    with pytest.raises(ValueError, match="image_size=60 must be divisible by 2\\*\\*\\(levels-1\\) = 8"):
        SegmentationConfig(image_size=60)


def test_images_without_masks_are_refused_naming_the_field(tmp_path):
    from busdiff.evaluate.inputs import InputError, read_synthetic
    from busdiff.evaluate.segmentation import corpus_pairs
    from tests.unit.evaluate_fixture import synthetic_folder

    folder = synthetic_folder(tmp_path / "sink" / "samples", 2)
    items = read_synthetic(folder, ["benign", "malignant", "normal"])
    with pytest.raises(InputError, match=r"evaluate.synthetic=.*samples: no masks/ beside it"):
        corpus_pairs(str(folder), items)
    lone = tmp_path / "sink" / "masks" / "benign" / f"{Path(items[0].path).stem}.png"
    lone.parent.mkdir(parents=True)
    lone.write_bytes(Path(items[0].path).read_bytes())
    with pytest.raises(InputError, match=r"5 image\(s\) have no mask in .*/masks, e.g. benign/"):
        corpus_pairs(str(folder), items)

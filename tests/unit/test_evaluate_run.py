"""run_evaluate without Ray (classifier off): classes missing on one side, splits, leakage mode."""

from __future__ import annotations

import json
import shutil

import pytest

from busdiff.config import load_config
from busdiff.evaluate.inputs import InputError, real_records, select
from busdiff.evaluate.leakage import LeakageError
from busdiff.evaluate.run import run_evaluate
from tests.unit.evaluate_fixture import real_phantom, shared_cache_dir, synthetic_folder


def _cfg(tmp_path, real, syn, *extra):
    return load_config(
        None,
        [
            f"data.root={real}",
            f"evaluate.synthetic={syn}",
            f"evaluate.out={tmp_path / 'out'}",
            f"evaluate.fid.cache_dir={shared_cache_dir()}",
            "evaluate.fid.device=cpu",
            "evaluate.fid.bootstrap=20",
            "evaluate.fid.floor_draws=2",
            "evaluate.classifier.enabled=false",
            "evaluate.memorization.ssim_size=32",
            *extra,
        ],
    )


def test_a_class_missing_on_one_side_is_reported_not_fatal(tmp_path):
    real = real_phantom(tmp_path / "busi", 14)
    syn = synthetic_folder(tmp_path / "samples", 3)
    shutil.rmtree(syn / "normal")  # no synthetic normal images at all
    for p in sorted((syn / "malignant").iterdir())[1:]:  # a single malignant one
        p.unlink()
    res = run_evaluate(_cfg(tmp_path, real, syn))
    rows = {r["class"]: r for r in res.metrics["fidelity"]["rows"]}
    assert "synthetic_vs_held_out" in rows["benign"] and "synthetic_vs_held_out" in rows["all"]
    assert rows["malignant"]["skipped"] == "fewer than 2 images in: synthetic"
    assert (
        rows["normal"]["skipped"] == "fewer than 2 images in: synthetic"
        and rows["normal"]["n_synthetic"] == 0
    )
    assert "skipped: fewer than 2 images in: synthetic" in (tmp_path / "out" / "report.html").read_text()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["classifier"] == {"enabled": False}


def test_bad_splits_and_leaks_stop_before_any_feature_work(tmp_path):
    real = real_phantom(tmp_path / "busi", 6)
    syn = synthetic_folder(tmp_path / "samples", 1)
    with pytest.raises(
        InputError, match=r"no images in split\(s\) holdout \(present: test 3, train 12, val 3\)"
    ):
        run_evaluate(_cfg(tmp_path, real, syn, "evaluate.held_out_splits=[holdout]"))
    # a held-out image that is a byte copy of a training image: leakage=error names both
    recs = real_records(real)
    train, test = select(recs, ["train"]), select(recs, ["test"])
    shutil.copy(train[0].image_path, test[0].image_path)
    with pytest.raises(
        LeakageError, match=f"{test[0].id}: exact duplicate: identical bytes to {train[0].id}"
    ):
        run_evaluate(_cfg(tmp_path, real, syn, "evaluate.leakage=error"))
    assert not (tmp_path / "out").exists()

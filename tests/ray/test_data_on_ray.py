from __future__ import annotations

import numpy as np

from busdiff.config import DataConfig, QualityConfig
from busdiff.data.busi import load_dataset
from busdiff.data.check import run_data_check
from busdiff.data.phantom import write_phantom
from busdiff.data.raydata import to_ray_dataset


def test_ray_dataset_has_image_label_mask_id(tmp_path):
    write_phantom(tmp_path, 3, seed=2, size=64)
    records = load_dataset(tmp_path).records
    rows = to_ray_dataset(records, size=48).take_all()
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in records)
    for row in rows:
        assert row["image"].shape == (48, 48, 3) and row["image"].dtype == np.uint8
        assert row["mask"].shape == (48, 48) and set(np.unique(row["mask"])) <= {0, 255}
        assert (row["mask"].max() == 0) == (row["label"] == "normal")


def test_check_on_ray_matches_in_process(tmp_path):
    write_phantom(tmp_path, 4, seed=3, size=64)
    data, quality = DataConfig(root=str(tmp_path)), QualityConfig()
    on_ray = run_data_check(data, quality, use_ray=True)
    local = run_data_check(data, quality, use_ray=False)
    assert on_ray == local
    assert on_ray["n_images"] == 12

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from busdiff.config import load_config
from busdiff.demo import run_demo, run_samples, sample_plan

FAST = [
    "sample.n_per_class=1",
    "sample.steps=4",
    "sample.size=32",
    "phantom.n_per_class=2",
    "phantom.size=64",
]


def test_plan_is_stable_and_seeds_unique():
    cfg = load_config(None, ["sample.n_per_class=3"])
    plan = sample_plan(cfg)
    assert plan == sample_plan(cfg)
    assert len({r["id"] for r in plan}) == len(plan) == 9
    assert len({r["seed"] for r in plan} | {r["refine_seed"] for r in plan}) == 18


def test_samples_do_not_depend_on_batching():
    one = run_samples(load_config(None, [*FAST, "sample.batch_size=1"]))
    three = run_samples(load_config(None, [*FAST, "sample.batch_size=3", "sample.num_actors=2"]))
    assert [r["id"] for r in one] == [r["id"] for r in three]
    for a, b in zip(one, three, strict=True):
        assert a["t2i"].shape == (32, 32, 3)
        np.testing.assert_allclose(a["t2i"].astype(int), b["t2i"].astype(int), atol=2)
        np.testing.assert_allclose(a["refined"].astype(int), b["refined"].astype(int), atol=2)
        assert np.abs(a["t2i"].astype(int) - a["refined"].astype(int)).mean() > 1, "img2img changed nothing"


def test_demo_writes_pictures_and_report(tmp_path):
    cfg = load_config(None, [*FAST, f"sample.out={tmp_path}/demo", f"data.root={tmp_path}/phantom"])
    res = run_demo(cfg)
    assert res.n_samples == 3
    grid = Image.open(res.sample_grid)
    assert grid.size[0] > 2 * 128 and grid.size[1] > 3 * 128
    assert Image.open(res.phantom_sheet).size[1] > 3 * 128
    report = json.loads((tmp_path / "demo" / "data_check.json").read_text())
    assert report["n_images"] == 6
    assert (tmp_path / "demo" / "config.yaml").is_file()

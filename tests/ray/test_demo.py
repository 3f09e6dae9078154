from __future__ import annotations

import json

from PIL import Image

from busdiff.config import load_config
from busdiff.generate.sink import SAMPLES

FAST = [
    "generate.count=1",
    "generate.steps=4",
    "generate.refine_steps=4",
    "generate.size=32",
    "phantom.n_per_class=2",
    "phantom.size=64",
]


def test_demo_writes_pictures_and_report(tmp_path):
    from busdiff.demo import run_demo

    cfg = load_config(
        None,
        [
            *FAST,
            f"generate.out={tmp_path}/demo",
            f"data.root={tmp_path}/phantom",
            "generate.keep_text2img=true",
        ],
    )
    res = run_demo(cfg)
    assert res.n_samples == 3 and res.generate.written == 3
    grid = Image.open(res.sample_grid)
    assert grid.size[0] > 2 * 128 and grid.size[1] > 3 * 128  # text2img | img2img, one row per image
    assert Image.open(res.phantom_sheet).size[1] > 3 * 128
    report = json.loads((tmp_path / "demo" / "data_check.json").read_text())
    assert report["n_images"] == 6
    assert (tmp_path / "demo" / "config.yaml").is_file()
    assert len(list((tmp_path / "demo" / SAMPLES).rglob("*.png"))) == 3
    # the demo is the generation pipeline: a second demo run makes no new image
    assert run_demo(cfg).generate.written == 0

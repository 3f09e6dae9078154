"""Mask-conditioned generation on Ray Data (the shared local cluster): every sample comes with the mask it
was conditioned on (a train image's, transformed), the corpus loads back as image + mask records, and a
grown plan and a rerun behave as for any sink. Then the segmentation judge trains on those pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from busdiff.config import load_config
from busdiff.data.busi import load_dataset, read_mask
from busdiff.data.phantom import write_phantom
from busdiff.data.splits import assign_splits
from busdiff.evaluate.run import run_evaluate
from busdiff.generate.masks import transform_mask
from busdiff.generate.pipeline import run_generate
from busdiff.generate.sink import MASKS, SAMPLES
from tests.ray.test_generate_pipeline import BASE, _sets, _snapshot
from tests.sinkcheck import assert_exactly_the_plan
from tests.unit.evaluate_fixture import shared_cache_dir

TRANSFORM = "generate.controlnet.transform"


def _cfg(root: Path, out: Path, count: int):
    return load_config(None, [*_sets(BASE), f"data.root={root}", f"generate.out={out}",
                              f"generate.count={count}", "generate.keep_text2img=true",
                              "generate.controlnet.model=preset",
                              f"{TRANSFORM}.degrees=25", f"{TRANSFORM}.scale=[0.8,1.2]",
                              f"{TRANSFORM}.elastic_alpha=2"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controlnet")
    root, out = tmp / "busi", tmp / "gen"
    write_phantom(root, 7, seed=5, size=64)  # a val and a test image per class
    # (a grown plan keeps its recipe and every earlier mask: tests/unit/test_generate_controlnet.py)
    return root, out, run_generate(_cfg(root, out, 2))


def test_each_sample_comes_with_its_mask_and_the_corpus_loads_back_as_pairs(corpus):
    root, out, res = corpus
    assert (res.written, res.planned) == (6, 6)
    cfg = _cfg(root, out, 2)
    assert_exactly_the_plan(out, cfg)

    records = {r.id: r for r in assign_splits(load_dataset(root).records, cfg.data.split)}
    meta = pq.read_table(out / SAMPLES / "metadata.parquet").to_pylist()
    assert len(meta) == 6
    for row in meta:
        mask = np.asarray(Image.open(out / row["mask_path"]))
        image = Image.open(out / SAMPLES / row["file_name"])
        assert row["mask_path"] == f"{MASKS}/{row['file_name']}" and mask.shape == image.size[::-1]
        assert row["controlnet"] == "preset:tiny"
        if row["class"] == "normal":
            assert row["condition_id"] == "" and not mask.any()  # an empty mask
            continue
        real = records[row["condition_id"]]
        assert real.split == "train" and real.label == row["class"]
        # the mask written is the one used: the real image's mask under the recorded transform
        expected = transform_mask(read_mask(real, (32, 32)), json.loads(row["mask_transform"]))
        assert np.array_equal(mask, expected) and mask.any()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["provenance"]["conditions"] == {r["id"]: r["condition_id"] for r in meta if r["condition_id"]}

    corpus = load_dataset(out)  # busdiff's own loader: the sink is a dataset of image + mask pairs
    assert corpus.layout == "corpus" and len(corpus.records) == 6
    assert all(r.split == "synthetic" and len(r.mask_paths) == 1 for r in corpus.records)

    before = _snapshot(out)
    again = run_generate(_cfg(root, out, 2))
    assert (again.written, again.skipped) == (0, 6) and _snapshot(out) == before


def test_the_evaluation_judges_the_pairs_with_a_segmentation_model(corpus, tmp_path):
    """evaluate.segmentation: U-Nets on real train pairs and on those plus the corpus's pairs, as Ray tasks,
    in metrics.json and the report beside FID."""
    root, out, _ = corpus
    seg = "evaluate.segmentation"
    sets = [f"data.root={root}", f"evaluate.synthetic={out / SAMPLES}", f"evaluate.out={tmp_path / 'eval'}",
            f"evaluate.fid.cache_dir={shared_cache_dir()}", "evaluate.fid.bootstrap=0",
            "evaluate.fid.device=cpu", "evaluate.classifier.enabled=false",
            "evaluate.memorization.enabled=false",
            f"{seg}.enabled=true", f"{seg}.image_size=32", f"{seg}.channels=[8, 16, 32]", f"{seg}.epochs=1",
            f"{seg}.seeds=[0]", f"{seg}.ratios=[0, 1]", f"{seg}.device=cpu"]
    cfg = load_config(None, sets)
    res = run_evaluate(cfg)
    judged = json.loads(Path(res.metrics_path).read_text())["segmentation"]
    assert judged["enabled"] and judged["n_failed"] == 0 and len(judged["runs"]) == 2  # 2 arms, 1 seed
    rows = {r["arm"]: r for r in judged["summary"]}
    # ratio 1 asks as many synthetic pairs as real ones: the corpus's 6 are used whole
    assert set(rows) == {"real-only", "ratio 1"} and rows["ratio 1"]["n_synthetic"] == [6]
    assert rows["ratio 1"]["vs_real_only"]["dice_lesion"]["n_pairs"] == 1  # paired by seed
    assert all(0 <= r["test"]["dice_lesion"] <= 1 for r in judged["runs"])
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "<h2>Segmentation judge</h2>" in html and "<td class=l>ratio 1</td>" in html

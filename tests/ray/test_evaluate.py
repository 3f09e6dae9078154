"""The evaluation stage on the shared Ray cluster: phantom "real" data against a fake synthetic folder,
with a leaked held-out image, a memorised copy, and images of mixed sizes and modes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busdiff.config import ClassifierConfig, load_config
from busdiff.evaluate.classifier import ClassifierInputs, run_experiments
from busdiff.evaluate.inputs import item_of, read_synthetic, real_records, select
from busdiff.evaluate.run import run_evaluate
from tests.browser import render
from tests.unit.evaluate_fixture import adapter_json_only, real_phantom, shared_cache_dir, synthetic_folder

TINY = [
    "evaluate.fid.bootstrap=40",
    "evaluate.fid.floor_draws=3",
    "evaluate.fid.kid_subsets=20",
    "evaluate.fid.device=cpu",
    "evaluate.classifier.image_size=32",
    "evaluate.classifier.epochs=1",
    "evaluate.classifier.batch_size=8",
    "evaluate.classifier.ratios=[0, 1]",
    "evaluate.classifier.seeds=[0, 1]",
    "evaluate.classifier.device=cpu",
    "evaluate.memorization.ssim_size=32",
    "evaluate.grid_per_class=3",
]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    real = real_phantom(tmp / "busi", 20)
    syn = synthetic_folder(tmp / "samples", 4)
    records = real_records(real)
    train, test = select(records, ["train"]), select(records, ["test"])
    # a synthetic image that is a training image (memorised), and images of other sizes and modes
    shutil.copy(train[0].image_path, syn / train[0].label / "copied.png")
    Image.open(syn / "malignant" / "syn_malignant_0001.png").convert("L").resize((48, 80)).save(
        syn / "malignant" / "syn_malignant_0001.png"
    )
    Image.open(syn / "normal" / "syn_normal_0002.png").convert("RGBA").resize((96, 96)).save(
        syn / "normal" / "syn_normal_0002.png"
    )
    leaked = next(r for r in test if r.label == "benign")
    adapter = adapter_json_only(tmp / "adapter", [r.id for r in train] + [leaked.id])
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.root={real}",
            f"evaluate.synthetic={syn}",
            f"evaluate.out={tmp / 'out'}",
            f"evaluate.adapters=[{adapter}]",
            f"evaluate.fid.cache_dir={shared_cache_dir()}",
        ],
    )
    res = run_evaluate(cfg)
    return res, cfg, {"leaked": leaked.id, "copied_from": train[0].id, "n_real": len(records), "tmp": tmp}


def test_fid_kid_per_class_with_floors_intervals_and_the_paper_protocol(evaluated):
    res, _, info = evaluated
    m = json.loads(Path(res.metrics_path).read_text())
    rows = {r["class"]: r for r in m["fidelity"]["rows"]}
    assert list(rows) == ["benign", "malignant", "normal", "all"]
    for name, r in rows.items():
        s, fl = r["synthetic_vs_held_out"], r["floor"]
        d = r["vs_floor"]
        assert d["fid_diff_ci"][0] < d["fid_diff"] < d["fid_diff_ci"][1], name
        assert s["kid_subset_size"] == min(s["n_a"], s["n_b"])  # follows the set sizes
        assert fl["n_pool_used"] == r["n_synthetic"] and fl["matched"], name  # floor at the synthetic count
        assert fl["n_held_out"] == r["n_held_out"]
    assert rows["all"]["n_synthetic"] == 13 and rows["benign"]["n_synthetic"] == 5
    assert rows["benign"]["n_held_out"] == 2  # 3 test images, one refused by the leakage guard
    paper = m["fidelity"]["paper_protocol"]
    assert paper["label"].startswith("paper protocol") and paper["n_a"] == info["n_real"]
    assert paper["mix"] == {"real": info["n_real"], "synthetic": 13}  # the authors' way: all real + synthetic
    assert m["features"]["computed"] + m["features"]["cached"] >= info["n_real"]


def test_leaked_held_out_image_is_refused_and_named(evaluated):
    res, _, info = evaluated
    refused = res.metrics["leakage"]["refused"]
    assert [x["id"] for x in refused] == [info["leaked"]]
    assert "trained on by adapter" in refused[0]["reason"]


def test_memorised_copy_is_flagged(evaluated):
    res, _, info = evaluated
    mem = res.metrics["memorization"]
    assert [r["id"] for r in mem["near_copies"]] == ["benign/copied"]
    assert mem["near_copies"][0]["nearest_id"] == info["copied_from"]
    assert mem["near_copies"][0]["ssim"] == pytest.approx(1.0)
    assert mem["real_baseline"]["cosine"]["n"] == res.metrics["inputs"]["held_out"]["n"]


def test_classifier_runs_every_ratio_and_seed(evaluated):
    clf = evaluated[0].metrics["classifier"]
    assert sorted((r["ratio"], r["seed"]) for r in clf["runs"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["status"] == "ok" for r in clf["runs"]) and clf["n_failed"] == 0
    assert clf["init"] == {"kind": "random"}
    one = next(r for r in clf["runs"] if r["ratio"] == 1)
    assert one["n_train_synthetic"] == sum(one["synthetic_draw"]["used"].values()) > 0
    assert [(s["set"], s["arm"]) for s in clf["summary"]] == [(None, "real-only"), ("synthetic", "ratio 1")]
    s1 = clf["summary"][1]
    assert s1["n_ok"] == 2 and s1["vs_real_only"]["accuracy"]["n_pairs"] == 2
    assert clf["protocol"]["name"] == "ratios" and clf["sets"] == ["synthetic"]


def test_inception_frozen_classifier_reads_fid_s_features_from_the_cache(evaluated, tmp_path):
    _, cfg, _ = evaluated
    again = cfg.model_copy(deep=True)
    again.evaluate.out = str(tmp_path / "frozen")
    again.evaluate.memorization.enabled = False
    again.evaluate.classifier = again.evaluate.classifier.model_copy(
        update={"model": "inception-frozen", "epochs": 5, "lr": 1e-3}
    )
    res = run_evaluate(again)
    clf, feats = res.metrics["classifier"], res.metrics["features"]
    assert clf["n_failed"] == 0 and clf["init"]["kind"] == "inception-frozen"
    assert feats["computed"] == 0  # every feature, val's too, from the first evaluation's cache
    for name in ("classifier train", "classifier val", "classifier test", "classifier syn"):
        assert feats["per_set"][name]["not_cached"] == 0, name
    assert feats["per_set"]["classifier test"]["n"] == res.metrics["inputs"]["held_out"]["n"]
    assert "frozen FID Inception" in Path(res.report_path).read_text()


def test_run_directory_holds_config_versions_inputs_and_outputs(evaluated):
    res, _, _ = evaluated
    out = Path(res.metrics_path).parent
    names = {p.name for p in out.iterdir()}
    assert {
        "config.yaml",
        "versions.json",
        "inputs.json",
        "metrics.json",
        "report.html",
        "samples.png",
    } <= names
    assert json.loads((out / "inputs.json").read_text())["inception_weights_sha256"]
    html = Path(res.report_path).read_text()
    assert "paper protocol" in html.lower() and "random initialisation" in html
    # self-contained: every image is embedded, nothing is fetched
    assert not re.search(r"""(?:src|href)=(?!["']?data:)""", html)


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    # the check itself can fail: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFunction()</script></body></html>")
    _, errors = render(bad.as_uri())
    assert any("undefinedFunction" in ln for ln in errors)

    shot = tmp_path / "report.png"
    _, errors = render(Path(evaluated[0].report_path).as_uri(), screenshot=shot, size=(1200, 2400))
    assert errors == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 20  # not blank: text, grids and plots on white
    assert (pixels < 200).mean() > 0.05


def test_second_evaluation_reuses_every_feature(evaluated, tmp_path):
    _, cfg, _ = evaluated
    again = cfg.model_copy(deep=True)
    again.evaluate.out = str(tmp_path / "again")
    again.evaluate.classifier.enabled = False
    again.evaluate.memorization.enabled = False
    res = run_evaluate(again)
    assert res.metrics["features"]["computed"] == 0
    assert res.metrics["classifier"] == {"enabled": False}
    rows = {r["class"]: r["synthetic_vs_held_out"]["fid"] for r in res.metrics["fidelity"]["rows"]}
    first = {r["class"]: r["synthetic_vs_held_out"]["fid"] for r in evaluated[0].metrics["fidelity"]["rows"]}
    assert rows == pytest.approx(first)


def test_a_crashing_run_is_retried_then_reported_not_dropped(tmp_path):
    # A model that cannot take 32 px input fails inside every run: each is retried, then listed as failed.
    real = real_phantom(tmp_path / "busi", 6)
    recs = real_records(real)
    syn = read_synthetic(synthetic_folder(tmp_path / "samples", 2))
    inputs = ClassifierInputs(
        *[[item_of(r) for r in select(recs, [s])] for s in ("train", "val", "test")], syn
    )
    cfg = ClassifierConfig(
        model="vit_tiny_patch16_224",
        image_size=32,
        epochs=1,
        ratios=[0],
        seeds=[0, 1],
        max_retries=1,
        device="cpu",
    )
    out = run_experiments(inputs, cfg, ["benign", "malignant", "normal"])
    assert out["n_failed"] == 2 and [r["seed"] for r in out["runs"]] == [0, 1]
    for r in out["runs"]:
        assert r["status"] == "failed" and r["attempts"] == 2
        assert "Input height (32) doesn't match model (224)" in r["error"]
    assert out["summary"][0]["n_failed"] == 2 and out["summary"][0]["n_ok"] == 0

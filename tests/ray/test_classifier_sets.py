"""Several synthetic sets judged at once on Ray with the inception-frozen classifier: the real-only runs
are launched once and shared, the features come from the cache FID filled, and the authors' top-up
protocol is labelled."""

from __future__ import annotations

import pytest

from busdiff.config import ClassifierConfig
from busdiff.evaluate.classifier import REAL_ONLY, ClassifierInputs, rows_of_set, run_experiments
from busdiff.evaluate.features import FeatureExtractor
from busdiff.evaluate.inputs import item_of, read_synthetic, real_records, select
from busdiff.evaluate.report import _classifier_section
from tests.unit.evaluate_fixture import fresh_cache_dir, real_phantom, shared_weights, synthetic_folder

CLASSES = ["benign", "malignant", "normal"]


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sets")
    recs = real_records(real_phantom(tmp / "busi", 7))
    train, val, test = ([item_of(r) for r in select(recs, [s])] for s in ("train", "val", "test"))
    sets = {name: read_synthetic(synthetic_folder(tmp / name, 3, seed=s)) for s, name in ((5, "a"), (6, "b"))}
    ext = FeatureExtractor(shared_weights(), fresh_cache_dir(tmp / "cache"), device="cpu")
    # what FID embeds: the synthetic sets, real train and held-out (not val)
    ext.features_of_sets({"real train": train, "real held-out": test, **sets})
    computed = ext.stats.n_computed
    inputs = ClassifierInputs(train, val, test, sets)
    cfg = ClassifierConfig(
        model=ClassifierConfig.FROZEN, epochs=8, lr=1e-3, ratios=[0, 1], seeds=[0, 1], device="cpu"
    )
    out = run_experiments(inputs, cfg, CLASSES, ext)
    return out, ext, computed, inputs, cfg


def test_real_only_runs_once_for_all_sets_and_each_set_pairs_with_them(judged):
    out, *_ = judged
    assert out["n_failed"] == 0 and out["sets"] == ["a", "b"]
    keys = sorted((str(r["set"]), r["arm"], r["seed"]) for r in out["runs"])
    assert keys == [
        ("None", REAL_ONLY, 0),
        ("None", REAL_ONLY, 1),
        ("a", "ratio 1", 0),
        ("a", "ratio 1", 1),
        ("b", "ratio 1", 0),
        ("b", "ratio 1", 1),
    ]  # 6 tasks, not 8: ratio 0 is not run once per set
    for name in ("a", "b"):
        base, row = rows_of_set(out, name)
        assert base["arm"] == REAL_ONLY and row["set"] == name and row["n_ok"] == 2
        assert row["vs_real_only"]["balanced_accuracy"]["n_pairs"] == 2
    run = next(r for r in out["runs"] if r["set"] == "b")
    assert run["n_train_synthetic"] == sum(run["synthetic_draw"]["used"].values()) > 0
    assert out["init"]["kind"] == "inception-frozen" and out["init"]["head"] == "mlp"


def test_frozen_features_come_from_the_fid_cache(judged):
    out, ext, computed, inputs, _ = judged
    per_set = ext.stats.per_set
    for name in ("classifier train", "classifier test", "classifier syn"):
        assert per_set[name]["not_cached"] == 0, name  # no second network pass
    assert per_set["classifier val"]["not_cached"] == len(inputs.val)  # only val was new
    assert ext.stats.n_computed == computed + len(inputs.val)
    assert out["init"]["extractor"] == ext.stats.extractor_id


def test_the_authors_topup_protocol_is_labelled_and_fills_to_the_count(judged):
    _, ext, _, inputs, cfg = judged
    top = cfg.model_copy(update={"protocol": "topup", "topup_per_class": 6, "seeds": [0]})
    out = run_experiments(inputs, top, CLASSES, ext)
    assert out["n_failed"] == 0 and out["protocol"]["name"] == "topup"
    assert (
        out["protocol"]["label"].startswith("the authors' protocol")
        and "6 per class" in out["protocol"]["label"]
    )
    assert [(r["set"], r["arm"]) for r in out["summary"]] == [
        (None, REAL_ONLY),
        ("a", "topup 6"),
        ("b", "topup 6"),
    ]
    real = out["n_real_train_per_class"]
    for r in out["runs"][1:]:
        draw = r["synthetic_draw"]
        assert draw["total"] == {c: max(6, real[c]) for c in CLASSES} or draw["short"]
        assert r["n_train_synthetic"] == sum(draw["used"].values())
    page = _classifier_section({**out, "enabled": True})
    assert "the authors&#x27; protocol" in page and "frozen FID Inception" in page and "topup 6" in page

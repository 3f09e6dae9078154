"""Classifier metrics against hand computation, the synthetic draws (ratios, the authors' top-up), the
run plan and summary of several synthetic sets, one training run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from busdiff.config import ClassifierConfig
from busdiff.evaluate.classifier import (
    REAL_ONLY,
    _plan,
    binary_auc,
    classification_metrics,
    rows_of_set,
    summarize,
    synthetic_subset,
    topup_subset,
    train_run,
)

CLASSES = ["benign", "malignant", "normal"]


def _auc_by_pairs(y, s):
    pos, neg = [v for v, t in zip(s, y, strict=True) if t], [v for v, t in zip(s, y, strict=True) if not t]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])


def test_auc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40).astype(bool)
    s = rng.integers(0, 5, 40).astype(float)  # many ties
    assert binary_auc(y, s) == pytest.approx(_auc_by_pairs(y, s))
    assert binary_auc(np.ones(3, bool), np.arange(3)) is None


def test_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 2, 1, 0, 2, 2])
    probs = np.eye(3)[pred] * 0.7 + 0.1
    m = classification_metrics(y, probs, CLASSES)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["recall"] == {"benign": 0.5, "malignant": 0.5, "normal": 1.0}
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    f1 = [2 * (2 / 3) * 0.5 / (2 / 3 + 0.5), 0.5, 2 * (2 / 3) / (2 / 3 + 1)]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["malignant_sensitivity"] == pytest.approx(0.5)
    assert m["malignant_specificity"] == pytest.approx(5 / 6)  # one benign called malignant
    assert m["auc"]["normal"] == pytest.approx(_auc_by_pairs(y == 2, probs[:, 2]))


def test_synthetic_draw_follows_ratio_and_reports_shortfall():
    real = {"benign": 10, "malignant": 4, "normal": 2}
    pool = {"benign": list(range(0, 30)), "malignant": list(range(30, 35)), "normal": []}
    idx, notes = synthetic_subset(real, pool, 1.0, seed=0)
    assert notes["used"] == {"benign": 10, "malignant": 4, "normal": 0}
    assert notes["short"] == ["normal: 2 requested, 0 available"]
    idx2, notes2 = synthetic_subset(real, pool, 2.0, seed=0)
    assert notes2["used"] == {"benign": 20, "malignant": 5, "normal": 0}
    assert synthetic_subset(real, pool, 1.0, seed=0)[0] == idx  # the same draw for the same seed
    assert synthetic_subset(real, pool, 1.0, seed=1)[0] != idx
    assert synthetic_subset(real, pool, 0.0, seed=0)[0] == []


def test_topup_fills_each_class_to_the_count_or_lists_the_shortfall():
    real = {"benign": 306, "malignant": 147, "normal": 93}
    pool = {
        "benign": list(range(0, 100)),
        "malignant": list(range(100, 400)),
        "normal": list(range(400, 500)),
    }
    idx, notes = topup_subset(real, pool, 350, seed=0)
    assert notes["requested"] == {"benign": 44, "malignant": 203, "normal": 257}
    assert notes["total"] == {"benign": 350, "malignant": 350, "normal": 193}  # normal: only 100 synthetic
    assert notes["short"] == ["normal: 257 requested, 100 available"]
    assert len(idx) == len(set(idx)) == 44 + 203 + 100
    assert all(0 <= i < 100 for i in idx[:44]) and all(100 <= i < 400 for i in idx[44:247])
    assert topup_subset(real, pool, 350, seed=0)[0] == idx and topup_subset(real, pool, 350, seed=1)[0] != idx
    # a class with more real images than the count gets no synthetic ones; no real image is dropped
    _, notes = topup_subset({"benign": 400, "normal": 10}, pool, 350, seed=0)
    assert notes["used"] == {"benign": 0, "normal": 100} and notes["total"] == {"benign": 400, "normal": 110}


def _pools(sets, per_class):
    start, out = 0, {}
    for name in sets:
        out[name] = {
            c: list(range(start + k * per_class, start + (k + 1) * per_class)) for k, c in enumerate(CLASSES)
        }
        start += per_class * len(CLASSES)
    return out


def test_plan_runs_real_only_once_for_several_sets():
    real = {"benign": 10, "malignant": 6, "normal": 4}
    pools = _pools(["lora", "lora_ti"], 30)
    cfg = ClassifierConfig(ratios=[0, 0.5, 1], seeds=[0, 1, 2])
    plan = _plan(cfg, real, pools)
    keys = [k for k, _, _ in plan]
    assert [k["seed"] for k in keys if k["set"] is None] == [0, 1, 2]  # once, not once per set
    assert all(k["arm"] == REAL_ONLY and k["ratio"] == 0 for k in keys if k["set"] is None)
    assert len(keys) == 3 + 2 * 2 * 3
    for k, index, _ in plan:
        if k["set"] is not None:
            lo = 0 if k["set"] == "lora" else 90  # each set's images only
            assert all(lo <= i < lo + 90 for i in index) and len(index) == round(k["ratio"] * 20)
    # the authors' protocol: real only + one topup arm per set, its effective ratio recorded
    top = _plan(cfg.model_copy(update={"protocol": "topup", "topup_per_class": 12}), real, pools)
    arms = list(dict.fromkeys((k["set"], k["arm"]) for k, _, _ in top))
    assert arms == [(None, REAL_ONLY), ("lora", "topup 12"), ("lora_ti", "topup 12")]
    k, index, notes = top[-1]
    assert notes["total"] == dict.fromkeys(CLASSES, 12) and k["ratio"] == pytest.approx(len(index) / 20)
    # no 0 among the ratios: no real-only runs, as configured
    assert all(k["set"] for k, _, _ in _plan(cfg.model_copy(update={"ratios": [1.0]}), real, pools))


def test_summary_pairs_every_set_with_the_shared_real_only_runs_by_seed():
    def run(name, arm, ratio, seed, acc):
        test = {"accuracy": acc, "recall": dict.fromkeys(CLASSES, acc)}
        return {
            "set": name,
            "arm": arm,
            "ratio": ratio,
            "seed": seed,
            "status": "ok",
            "n_train_synthetic": int(ratio * 10),
            "test": test,
        }

    runs = [
        run(None, REAL_ONLY, 0, 0, 0.6),
        run(None, REAL_ONLY, 0, 1, 0.7),
        run("a", "ratio 1", 1, 0, 0.7),
        run("a", "ratio 1", 1, 1, 0.75),
        {"set": "a", "arm": "ratio 1", "ratio": 1, "seed": 2, "status": "failed", "n_train_synthetic": 10},
        run("b", "ratio 1", 1, 0, 0.5),
        run("b", "ratio 1", 1, 1, 0.7),
    ]
    rows = summarize(runs, CLASSES)
    assert [(r["set"], r["arm"]) for r in rows] == [(None, REAL_ONLY), ("a", "ratio 1"), ("b", "ratio 1")]
    assert rows[0]["accuracy"]["mean"] == pytest.approx(0.65) and "vs_real_only" not in rows[0]
    a, b = rows[1]["vs_real_only"]["accuracy"], rows[2]["vs_real_only"]["accuracy"]
    assert rows[1]["n_failed"] == 1 and a["n_pairs"] == 2 and a["wins"] == 2
    assert a["mean_diff"] == pytest.approx(0.075) and b["mean_diff"] == pytest.approx(-0.05)
    assert b["losses"] == 1 and b["wins"] == 0  # seed 1 ties
    assert rows_of_set({"summary": rows}, "b") == [rows[0], rows[2]]


def _arrays(n, size, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    x[..., 0] += (y * 80).astype(np.uint8)[:, None, None]  # learnable: the class is the red level
    return x, y


def test_one_run_trains_selects_on_val_and_scores_test(tmp_path):
    import timm

    (tx, ty), (vx, vy), (sx, sy), (ex, ey) = (
        _arrays(18, 32, 0),
        _arrays(6, 32, 1),
        _arrays(9, 32, 2),
        _arrays(12, 32, 3),
    )
    arrays = {
        "train_x": tx,
        "train_y": ty,
        "val_x": vx,
        "val_y": vy,
        "test_x": ex,
        "test_y": ey,
        "syn_x": sx,
        "syn_y": sy,
    }
    pretrained = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=1000).state_dict(), str(pretrained))
    spec = {
        "model": "resnet18",
        "pretrained": str(pretrained),
        "epochs": 3,
        "batch_size": 8,
        "lr": 1e-3,
        "seed": 0,
        "ratio": 1.0,
        "classes": CLASSES,
        "select_metric": "balanced_accuracy",
        "device": "cpu",
        "threads": 1,
        "syn_index": [0, 3, 5],
    }
    torch.set_num_threads(2)
    try:
        res = train_run(spec, arrays)
        assert res["threads"] == 1 and torch.get_num_threads() == 2  # its own count, then the caller's back
    finally:
        torch.set_num_threads(1)
    assert res["status"] == "ok" and res["n_train_synthetic"] == 3 and len(res["curve"]) == 3
    vals = [c["val"] for c in res["curve"]]
    assert res["best_epoch"] == int(np.argmax(vals)) and res["val_best"] == max(vals)  # first best epoch
    assert res["test"]["n"] == 12  # scored on the test arrays, not on val
    assert set(res["test"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "auc", "malignant_sensitivity"}
    # the model scored is the selected epoch's: scoring it on val reproduces the best val figure
    on_val = train_run(spec, {**arrays, "test_x": vx, "test_y": vy})
    assert on_val["best_epoch"] == res["best_epoch"]
    assert on_val["test"]["balanced_accuracy"] == pytest.approx(res["val_best"])
    # ImageNet weights from a local file: everything but the 1000-class head is loaded
    assert res["init"]["kind"] == "pretrained" and res["init"]["skipped"] == ["fc.bias", "fc.weight"]

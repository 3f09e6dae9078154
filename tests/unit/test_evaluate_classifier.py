"""Classifier metrics against hand computation, the synthetic draw per ratio, one training run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from busdiff.evaluate.classifier import (
    binary_auc,
    classification_metrics,
    summarize,
    synthetic_subset,
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


def test_summary_pairs_each_ratio_with_real_only_by_seed():
    def run(ratio, seed, acc):
        test = {"accuracy": acc, "recall": dict.fromkeys(CLASSES, acc)}
        return {
            "ratio": ratio,
            "seed": seed,
            "status": "ok",
            "n_train_synthetic": int(ratio * 10),
            "test": test,
        }

    runs = [
        run(0, 0, 0.6),
        run(0, 1, 0.7),
        run(1, 0, 0.7),
        run(1, 1, 0.75),
        {"ratio": 1, "seed": 2, "status": "failed", "error": "boom", "n_train_synthetic": 10},
    ]
    rows = summarize(runs, [0, 1], CLASSES)
    assert rows[0]["accuracy"]["mean"] == pytest.approx(0.65) and rows[1]["n_failed"] == 1
    paired = rows[1]["vs_real_only"]["accuracy"]
    assert paired["n_pairs"] == 2 and paired["mean_diff"] == pytest.approx(0.075) and paired["wins"] == 2


def _arrays(n, size, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    x[..., 0] += (y * 80).astype(np.uint8)[:, None, None]  # learnable: the class is the red level
    return x, y


def test_one_run_trains_selects_on_val_and_scores_test(tmp_path):
    import timm

    (tx, ty), (vx, vy), (sx, sy) = _arrays(18, 32, 0), _arrays(6, 32, 1), _arrays(9, 32, 2)
    arrays = {
        "train_x": tx,
        "train_y": ty,
        "val_x": vx,
        "val_y": vy,
        "test_x": vx,
        "test_y": vy,
        "syn_x": sx,
        "syn_y": sy,
    }
    pretrained = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=1000).state_dict(), str(pretrained))
    spec = {
        "model": "resnet18",
        "pretrained": str(pretrained),
        "epochs": 2,
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
    res = train_run(spec, arrays)
    assert res["status"] == "ok" and res["n_train_synthetic"] == 3 and len(res["curve"]) == 2
    assert res["val_best"] == max(c["val"] for c in res["curve"])
    assert res["best_epoch"] in (0, 1)
    assert set(res["test"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "auc", "malignant_sensitivity"}
    # ImageNet weights from a local file: everything but the 1000-class head is loaded
    assert res["init"]["kind"] == "pretrained" and res["init"]["skipped"] == ["fc.bias", "fc.weight"]
    assert torch.get_num_threads() >= 1

"""Benchmark: the real-only classifier baseline on busi-256's test split, several seeds.

    python jobs/benchmarks/classifier_baseline_busi256.py [--root ../shared/datasets/busi-256] \
        [--seeds 0 1 2 3 4 5 6 7 8 9] [--timm-seeds 0 1 2] [--timm-epochs 20] [--no-timm] [--device cpu|cuda]

Real train only (ratio 0); the model is picked on val and scored once on test. The leakage guard is applied
as ``run_evaluate`` does (``guard_held_out`` of the val and test images against the train split: the same
image, or an exact or near duplicate of a training image, is dropped and listed). Each (model, seed) run
is one Ray task, through ``run_experiments``, as in an evaluation. Models:

1. ``inception-frozen``: a head on the frozen FID Inception network's 2048-d features (ImageNet-trained,
   offline weights), read from the content-keyed feature cache (``--cache-dir``; the first run embeds the
   780 images, about 2-15 minutes on 2 shared cores, later runs read the cache). Two heads: an MLP (256
   hidden units, lr 1e-3, 30 epochs, batch 32) and a linear one (lr 1e-3, weight decay 0.1, 100 epochs,
   batch 32); those settings were picked on val balanced accuracy (seeds 0-2), never on test.
2. A timm resnet18 from random initialisation at 64 px (lr 1e-3, batch 32), for comparison.

Writes runs/benchmarks/classifier_baseline_busi256.json and prints a table: mean ± std over seeds of
balanced accuracy, macro-F1, macro one-vs-rest AUC and malignant sensitivity on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from busdiff.config import CLASSES, ClassifierConfig, QualityConfig
from busdiff.evaluate.classifier import REAL_ONLY, ClassifierInputs, run_experiments
from busdiff.evaluate.compare import device_name
from busdiff.evaluate.features import FeatureExtractor
from busdiff.evaluate.inception import resolve_weights
from busdiff.evaluate.inputs import item_of, real_records, select
from busdiff.evaluate.leakage import guard_held_out
from busdiff.storage import write_text

REPO = Path(__file__).resolve().parents[2]
SHOWN = ("balanced_accuracy", "macro_f1", "auc_macro", "malignant_sensitivity", "accuracy")


def _models(a: argparse.Namespace, device: str) -> dict[str, ClassifierConfig]:
    common: dict[str, Any] = {"ratios": [0], "device": device, "num_cpus": 1, "max_retries": 0}
    frozen = {"model": ClassifierConfig.FROZEN, "batch_size": 32, "lr": 1e-3, "seeds": a.seeds}
    models = {
        "inception-frozen, mlp head": ClassifierConfig(
            **common, **frozen, head="mlp", head_hidden=256, epochs=30
        ),
        "inception-frozen, linear head": ClassifierConfig(
            **common, **frozen, head="linear", epochs=100, weight_decay=0.1
        ),
    }
    if not a.no_timm:
        models["resnet18, random init, 64 px"] = ClassifierConfig(
            **common,
            model="resnet18",
            image_size=64,
            epochs=a.timm_epochs,
            batch_size=32,
            lr=1e-3,
            seeds=a.timm_seeds,
            num_gpus=1 if device == "cuda" else 0,
        )
    return models


def _row(name: str, out: dict[str, Any]) -> dict[str, Any]:
    (real,) = [s for s in out["summary"] if s["arm"] == REAL_ONLY]
    ok = [r for r in out["runs"] if r["status"] == "ok"]
    return {
        "model": name,
        "config": out["config"],
        "init": out["init"],
        "n_ok": real["n_ok"],
        "n_failed": real["n_failed"],
        "seeds": [r["seed"] for r in ok],
        **{m: real[m] for m in SHOWN},
        "recall": real["recall"],
        "per_seed": {m: [r["test"][m] for r in ok] for m in SHOWN},
        "best_epochs": [r["best_epoch"] for r in ok],
        "val_best": [r["val_best"] for r in ok],
        "timing": out["timing"],
        "errors": [r["error"] for r in out["runs"] if r["status"] != "ok"],
    }


def _cell(v: dict[str, Any]) -> str:
    if v["mean"] is None:
        return "–"
    return f"{v['mean']:.3f} ± {v['std']:.3f}" if v["std"] is not None else f"{v['mean']:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "busi-256"))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument("--inception-weights", default="auto")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="inception-frozen seeds")
    p.add_argument("--timm-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--timm-epochs", type=int, default=20)
    p.add_argument("--no-timm", action="store_true", help="skip the resnet18 comparison")
    p.add_argument("--out", default="runs/benchmarks/classifier_baseline_busi256.json")
    a = p.parse_args()

    import ray

    t0 = time.perf_counter()
    dev = device_name(a.device)
    records = [r for r in real_records(a.root) if r.label in CLASSES]
    guard = guard_held_out(
        select(records, ["val", "test"]), records, train_split="train", quality=QualityConfig()
    )
    train = [item_of(r) for r in select(records, ["train"])]
    val = [item_of(r) for r in guard.kept if r.split == "val"]
    test = [item_of(r) for r in guard.kept if r.split == "test"]
    inputs = ClassifierInputs(train, val, test, {})  # no synthetic set: the real-only runs alone
    weights = resolve_weights(a.inception_weights, a.cache_dir)
    ext = FeatureExtractor(weights, a.cache_dir, a.inception_weights, dev, batch_size=32)

    ray.init(
        num_cpus=os.cpu_count(),
        object_store_memory=500 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
    )
    rows = []
    try:
        for name, cfg in _models(a, dev).items():
            print(f"{name}: {len(cfg.seeds)} seeds ...", flush=True)
            rows.append(_row(name, run_experiments(inputs, cfg, CLASSES, ext)))
    finally:
        ray.shutdown()

    def per_class(items: list) -> dict[str, int]:
        return {c: sum(it.label == c for it in items) for c in CLASSES}

    head = f"| model | seeds | {' | '.join(SHOWN)} |"
    table = [head, "|" + " --- |" * (len(SHOWN) + 2)]
    table += [
        f"| {r['model']} | {r['n_ok']} | " + " | ".join(_cell(r[m]) for m in SHOWN) + " |" for r in rows
    ]
    s = ext.stats
    result = {
        "root": a.root,
        "device": dev,
        "splits": {"train": per_class(train), "val": per_class(val), "test": per_class(test)},
        "leakage": {
            "refused": len(guard.refused),
            "by_split": {sp: sum(x["split"] == sp for x in guard.refused) for sp in ("val", "test")},
            "by_kind": {
                k: sum(x["kind"] == k for x in guard.refused) for k in {x["kind"] for x in guard.refused}
            },
            "ids": [x["id"] for x in guard.refused],
        },
        "features": {"extractor": s.extractor_id, "computed": s.n_computed, "cached": s.n_cached},
        "rows": rows,
        "table": table,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_text(a.out, json.dumps(result, indent=2) + "\n")
    print(
        f"busi-256, real train only; model picked on val, scored on test (n={len(test)}: {per_class(test)})"
    )
    print(f"leakage guard: {len(guard.refused)} val/test image(s) refused {result['leakage']['by_split']}")
    print("\n".join(table))
    print(f"features: {s.n_computed} computed, {s.n_cached} cached; {result['seconds']} s; -> {a.out}")
    return 0 if all(r["n_failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

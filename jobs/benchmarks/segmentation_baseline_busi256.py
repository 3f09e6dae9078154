"""Benchmark: the real-only segmentation baseline (the segmentation judge's real-only arm) on busi-256's
test split, several seeds.

    python jobs/benchmarks/segmentation_baseline_busi256.py [--root ../shared/datasets/busi-256] \
        [--seeds 0 1 2] [--size 64] [--epochs 30] [--device cpu|cuda]

A MONAI U-Net (busdiff.evaluate.segmentation: channels 16-32-64-128, DiceLoss, Adam 1e-3, batch 16, flips)
on the train split's image + mask pairs; the epoch with the best val lesion Dice is scored once on test.
The leakage guard is applied as ``run_evaluate`` does (val and test images that are, or nearly are,
training images are dropped). Each seed is one Ray task. Writes
runs/benchmarks/segmentation_baseline_busi256.json and prints Dice / IoU per lesion class (mean ± std).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from busdiff.config import CLASSES, QualityConfig, SegmentationConfig
from busdiff.evaluate.compare import device_name
from busdiff.evaluate.inputs import real_records, select
from busdiff.evaluate.leakage import guard_held_out
from busdiff.evaluate.segmentation import SCALARS, run_segmentation
from busdiff.storage import write_text

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "busi-256"))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", default="runs/benchmarks/segmentation_baseline_busi256.json")
    a = p.parse_args()
    if not Path(a.root, "manifest.csv").is_file():
        print(f"no busi-256 copy at {a.root} (manifest.csv): nothing to measure", file=sys.stderr)
        return 2

    import ray

    t0 = time.perf_counter()
    dev = device_name(a.device)
    records = [r for r in real_records(a.root) if r.label in CLASSES]
    guard = guard_held_out(select(records, ["val", "test"]), records, train_split="train",
                           quality=QualityConfig())
    real = {"train": select(records, ["train"]), "val": [r for r in guard.kept if r.split == "val"],
            "test": [r for r in guard.kept if r.split == "test"]}
    cfg = SegmentationConfig(enabled=True, image_size=a.size, epochs=a.epochs, seeds=a.seeds, ratios=[0],
                             device=dev, num_gpus=1 if dev == "cuda" else 0, max_retries=0)
    ray.init(num_cpus=os.cpu_count(), object_store_memory=500 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    try:
        out = run_segmentation(real, {}, cfg)
    finally:
        ray.shutdown()
    (row,) = out["summary"]

    def cell(v: dict) -> str:
        if v["mean"] is None:
            return "–"
        return f"{v['mean']:.3f} ± {v['std']:.3f}" if v["std"] is not None else f"{v['mean']:.3f}"

    per_class = {s: {c: sum(r.label == c for r in real[s]) for c in CLASSES} for s in real}
    result = {
        "root": a.root, "device": dev, "splits": per_class,
        "leakage": {"refused": len(guard.refused), "ids": [x["id"] for x in guard.refused]},
        "config": out["config"], "summary": row,
        "per_seed": {m: [r["test"][m] for r in out["runs"] if r["status"] == "ok"] for m in SCALARS},
        "best_epochs": [r.get("best_epoch") for r in out["runs"]],
        "errors": [r["error"] for r in out["runs"] if r["status"] != "ok"],
        "timing": out["timing"], "seconds": round(time.perf_counter() - t0, 1),
    }
    write_text(a.out, json.dumps(result, indent=2) + "\n")
    print(f"busi-256 at {a.size} px, real train pairs only; best epoch by val lesion Dice, scored on test "
          f"({per_class['test']}); leakage guard refused {len(guard.refused)} val/test image(s)")
    print("| " + " | ".join(SCALARS) + " |")
    print("|" + " --- |" * len(SCALARS))
    print("| " + " | ".join(cell(row[m]) for m in SCALARS) + " |")
    print(f"{row['n_ok']} seeds ok, {row['n_failed']} failed; {result['seconds']} s -> {a.out}")
    return 0 if row["n_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: evaluation throughput. Writes runs/benchmarks/evaluate_throughput.json and prints a table.

    python jobs/benchmarks/evaluate_throughput.py [--device cpu|cuda] [--real-per-class 40] \
        [--syn-per-class 20] [--model resnet18] [--runs 4]

1. Inception feature extraction, images/s, with an empty feature cache (cold) and again (warm: from the
   cache).
2. A whole evaluation (``run_evaluate``, classifier off) with an empty feature cache, then against the same
   real set again (every feature from the cache); target: warm >= 5x faster.
Each figure is the median of ``--repeats`` runs (the 2-core machine is shared, so single timings are
noisy); the one-off conversion of the Inception weights is done first and timed on its own, never inside a
cold run.
3. Classifier experiments: N (ratio, seed) runs as parallel Ray tasks (``--num-cpus-per-run`` each) against
   the same runs one after another in this process with every core; and runs per hour.

Data: phantom "real" data (Kaggle layout) and a phantom "synthetic" folder at --size px. On a CUDA GPU
(--device cuda) features and classifier runs use the GPU (one GPU per run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from busdiff.config import ClassifierConfig, RayConfig, load_config
from busdiff.data.phantom import write_phantom
from busdiff.evaluate.classifier import (
    ClassifierInputs,
    load_images,
    run_experiments,
    synthetic_subset,
    train_run,
)
from busdiff.evaluate.compare import device_name
from busdiff.evaluate.features import FeatureExtractor
from busdiff.evaluate.inception import resolve_weights
from busdiff.evaluate.inputs import item_of, read_synthetic, real_records, select, write_phantom_synthetic
from busdiff.evaluate.run import run_evaluate
from busdiff.storage import write_text

CLASSES = ["benign", "malignant", "normal"]


def _median_s(fn, repeats: int) -> tuple[float, list[float], object]:
    """Median seconds of ``repeats`` calls of ``fn(k)``, every time, and the last call's result."""
    times, res = [], None
    for k in range(repeats):
        t = time.perf_counter()
        res = fn(k)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), [round(x, 3) for x in times], res


def _features(work: Path, items, device: str, batch: int, repeats: int) -> dict:
    t = time.perf_counter()
    weights = resolve_weights("auto", work / "weights", download_timeout_s=0)
    convert_s = time.perf_counter() - t

    def cold(k: int):  # a fresh feature cache each time, the converted weights kept
        ext = FeatureExtractor(weights, work / f"cache-features-{k}", device=device, batch_size=batch)
        ext.features(items)
        return ext

    def warm(k: int):
        ext = FeatureExtractor(weights, work / "cache-features-0", device=device, batch_size=batch)
        ext.features(items)
        return ext

    cold_s, cold_runs, _ = _median_s(cold, repeats)
    warm_s, warm_runs, last = _median_s(warm, repeats)
    return {
        "n_images": len(items),
        "weights_convert_s": round(convert_s, 2),
        "cold_s": round(cold_s, 2),
        "cold_runs_s": cold_runs,
        "cold_images_per_s": round(len(items) / cold_s, 2),
        "warm_s": round(warm_s, 3),
        "warm_runs_s": warm_runs,
        "warm_images_per_s": round(len(items) / warm_s, 1),
        "speedup": round(cold_s / warm_s, 1),
        "warm_computed": last.stats.n_computed,
    }


def _evaluation_twice(work: Path, real: Path, syn: Path, device: str, repeats: int) -> dict:
    """Whole evaluations with an empty feature cache (cold), then with every feature cached (warm)."""
    weights = resolve_weights("auto", work / "weights", download_timeout_s=0).path

    def run(k: int, cache: str):
        (work / cache).mkdir(parents=True, exist_ok=True)
        target = work / cache / weights.name
        if not target.exists():
            os.link(weights, target)  # the converted weights, so no run converts them again
        cfg = load_config(
            None,
            [
                f"data.root={real}",
                f"evaluate.synthetic={syn}",
                f"evaluate.out={work}/eval-{cache}-{k}",
                f"evaluate.fid.cache_dir={work / cache}",
                f"evaluate.fid.device={device}",
                "evaluate.fid.workers=0",
                "evaluate.classifier.enabled=false",
            ],
        )
        return run_evaluate(cfg).metrics

    cold_s, cold_runs, first = _median_s(lambda k: run(k, f"cache-eval-{k}"), repeats)
    warm_s, warm_runs, last = _median_s(lambda k: run(k, "cache-eval-0"), repeats)
    return {
        "first_s": round(cold_s, 2),
        "second_s": round(warm_s, 2),
        "cold_runs_s": cold_runs,
        "warm_runs_s": warm_runs,
        "speedup": round(cold_s / warm_s, 1),
        "computed_first": first["features"]["computed"],
        "computed_warm": last["features"]["computed"],
        "timings_first": first["timings"],
        "timings_warm": last["timings"],
    }


def _classifier(real: Path, syn: Path, a: argparse.Namespace, device: str) -> dict:
    import ray

    recs = real_records(real)
    synthetic = read_synthetic(syn)
    inputs = ClassifierInputs(
        *[[item_of(r) for r in select(recs, [s])] for s in ("train", "val", "test")], synthetic
    )
    gpu = device == "cuda"
    seeds = list(range(a.runs // 2))
    cfg = ClassifierConfig(
        model=a.model,
        image_size=a.image_size,
        epochs=a.epochs,
        batch_size=16,
        ratios=[0, 1],
        seeds=seeds,
        device=device,
        num_cpus=a.num_cpus_per_run,
        num_gpus=1 if gpu else 0,
        max_retries=0,
    )
    t = time.perf_counter()
    par = run_experiments(inputs, cfg, CLASSES)
    parallel_s = time.perf_counter() - t
    assert par["n_failed"] == 0, par["runs"]
    ray.shutdown()

    # the same runs, one after another in this process, each with every core
    cores = os.cpu_count() or 1
    size = a.image_size
    arrays = {
        "train_x": load_images(inputs.train, size),
        "val_x": load_images(inputs.val, size),
        "test_x": load_images(inputs.test, size),
        "syn_x": load_images(inputs.synthetic, size),
    }
    for name, items in (
        ("train", inputs.train),
        ("val", inputs.val),
        ("test", inputs.test),
        ("syn", synthetic),
    ):
        arrays[f"{name}_y"] = np.array([CLASSES.index(it.label) for it in items])
    counts = {c: int((arrays["train_y"] == k).sum()) for k, c in enumerate(CLASSES)}
    pools = {c: [i for i, it in enumerate(synthetic) if it.label == c] for c in CLASSES}
    t = time.perf_counter()
    for ratio in cfg.ratios:
        for seed in seeds:
            spec = {
                "model": a.model,
                "pretrained": None,
                "epochs": a.epochs,
                "batch_size": 16,
                "lr": 1e-4,
                "seed": seed,
                "ratio": ratio,
                "classes": CLASSES,
                "select_metric": "balanced_accuracy",
                "device": device,
                "threads": cores,
                "syn_index": synthetic_subset(counts, pools, ratio, seed)[0],
            }
            train_run(spec, arrays)
    sequential_s = time.perf_counter() - t
    n = len(par["runs"])
    return {
        "runs": n,
        "model": a.model,
        "image_size": size,
        "epochs": a.epochs,
        "n_train_real": len(inputs.train),
        "num_cpus_per_run": a.num_cpus_per_run,
        "parallel_s": round(parallel_s, 2),
        "sequential_s": round(sequential_s, 2),
        "speedup": round(sequential_s / parallel_s, 2),
        "runs_per_hour_parallel": round(3600 * n / parallel_s),
        "runs_per_hour_sequential": round(3600 * n / sequential_s),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--real-per-class", type=int, default=40)
    p.add_argument("--syn-per-class", type=int, default=20)
    p.add_argument("--size", type=int, default=256, help="phantom image side (px)")
    p.add_argument("--batch-size", type=int, default=32, help="feature extraction batch")
    p.add_argument("--model", default="resnet18", help="timm classifier")
    p.add_argument("--runs", type=int, default=4, help="classifier runs: ratios 0 and 1 x runs/2 seeds")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64, help="classifier input side (px)")
    p.add_argument("--num-cpus-per-run", type=float, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs per timing; the median is reported")
    p.add_argument("--skip-classifier", action="store_true")
    p.add_argument("--skip-fidelity", action="store_true", help="classifier comparison only")
    p.add_argument("--out", default="runs/benchmarks/evaluate_throughput.json")
    a = p.parse_args()
    device = device_name(a.device)
    work = Path(tempfile.mkdtemp(prefix="busdiff-bench-eval-"))
    try:
        real = work / "busi"
        write_phantom(real, a.real_per_class, seed=1, size=a.size)
        syn = write_phantom_synthetic(work / "samples", a.syn_per_class, seed=2, size=a.size)
        items = [item_of(r) for r in real_records(real)] + read_synthetic(syn)
        assert items
        result = {
            "device": device,
            "machine": f"{os.cpu_count()} CPU cores",
            "images_px": a.size,
            "n_real": 3 * a.real_per_class,
            "n_synthetic": 3 * a.syn_per_class,
        }
        if not a.skip_fidelity:
            result["features"] = _features(work, items, device, a.batch_size, a.repeats)
            result["evaluation"] = _evaluation_twice(work, real, syn, device, a.repeats)
        if not a.skip_classifier:
            from busdiff.raycluster import connect

            connect(RayConfig(num_cpus=os.cpu_count(), object_store_memory=300 * 1024**2))
            result["classifier"] = _classifier(real, syn, a, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_text(a.out, json.dumps(result, indent=2) + "\n")

    print(f"device: {device} ({result['machine']}), phantom images {a.size} px")
    print(f"{'measure':<46} {'value':>12}")
    if "features" in result:
        f, e = result["features"], result["evaluation"]
        print(f"{'feature extraction, cold cache (images/s)':<46} {f['cold_images_per_s']:>12}")
        print(f"{'feature extraction, warm cache (images/s)':<46} {f['warm_images_per_s']:>12}")
        print(f"{'feature cache speed-up (x)':<46} {f['speedup']:>12}")
        print(f"{'evaluation cold / warm cache, medians (s)':<46} {e['first_s']:>5} / {e['second_s']:<5}")
        print(f"{'evaluation speed-up, same real set (x)':<46} {e['speedup']:>12}")
    if "classifier" in result:
        c = result["classifier"]
        print(f"{'classifier runs: parallel Ray tasks (s)':<46} {c['parallel_s']:>12}")
        print(f"{'classifier runs: one after another (s)':<46} {c['sequential_s']:>12}")
        print(f"{'classifier parallel speed-up (x)':<46} {c['speedup']:>12}")
        print(f"{'classifier runs per hour (parallel)':<46} {c['runs_per_hour_parallel']:>12}")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

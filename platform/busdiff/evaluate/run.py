"""``run_evaluate(cfg)``: the evaluation stage from inputs to metrics.json and report.html.

1. Read the synthetic folder and the real data (``cfg.data``); check splits and classes before any work.
2. Leakage guard on the held-out real images (:mod:`busdiff.evaluate.leakage`).
3. Inception features of every image through the content-keyed cache (misses as Ray tasks).
4. FID/KID per class and for all classes, each with its bootstrap interval and the matched-size
   real-vs-real floor; the paper's protocol beside them, labelled.
5. Memorization audit; 6. classifier experiments as Ray tasks; 7. metrics.json + report.html.

The caller connects to Ray (jobs/evaluate.py, ``busdiff evaluate``); the library never calls ray.init.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from busdiff.config import BusdiffConfig, dump_config
from busdiff.evaluate.classifier import ClassifierInputs, run_experiments
from busdiff.evaluate.compare import device_name
from busdiff.evaluate.features import FeatureExtractor, ImageItem, with_hashes
from busdiff.evaluate.fidelity import FidelityError, compare, floor
from busdiff.evaluate.inception import resolve_weights
from busdiff.evaluate.inputs import InputError, item_of, read_synthetic, real_records, select
from busdiff.evaluate.leakage import guard_held_out
from busdiff.evaluate.memorization import audit
from busdiff.evaluate.report import png_bytes, render_html, sample_grid
from busdiff.provenance import package_versions
from busdiff.storage import write_bytes, write_text

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    out: str
    metrics_path: str
    report_path: str
    metrics: dict[str, Any]
    seconds: float


def _by_class(items: list[ImageItem]) -> dict[str, int]:
    return dict(sorted(Counter(it.label or "none" for it in items).items()))


def _fidelity_row(label: str, syn: np.ndarray, held: np.ndarray, pool: np.ndarray, f) -> dict[str, Any]:
    row: dict[str, Any] = {
        "class": label,
        "n_synthetic": len(syn),
        "n_held_out": len(held),
        "n_pool": len(pool),
    }
    missing = [
        name for name, x in (("synthetic", syn), ("held-out real", held), ("real train", pool)) if len(x) < 2
    ]
    if missing:
        row["skipped"] = f"fewer than 2 images in: {', '.join(missing)}"
        return row
    try:
        row["synthetic_vs_held_out"] = compare(
            syn,
            held,
            kid_subset=f.kid_subset_size,
            kid_subsets=f.kid_subsets,
            bootstrap=f.bootstrap,
            ci=f.ci,
            seed=f.seed,
        )
        row["floor"] = floor(
            pool,
            held,
            len(syn),
            draws=f.floor_draws,
            kid_subset=f.kid_subset_size,
            kid_subsets=f.kid_subsets,
            ci=f.ci,
            seed=f.seed,
        )
    except FidelityError as e:
        row["skipped"] = str(e)
        row.pop("synthetic_vs_held_out", None)
    return row


def run_evaluate(cfg: BusdiffConfig) -> EvaluateResult:
    """Evaluate ``cfg.evaluate.synthetic`` against the real data of ``cfg.data``; see the module docstring."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    mark = [t0]

    def lap(name: str) -> None:  # seconds since the previous lap
        now = time.perf_counter()
        timings[name] = round(now - mark[0], 2)
        mark[0] = now

    ev = cfg.evaluate
    classes = list(ev.classes)
    if not ev.synthetic:
        raise InputError(
            "evaluate.synthetic is not set: give the folder of synthetic images (<class>/<id>.png)"
        )

    # 1. inputs, all checked before any expensive work
    synthetic = with_hashes(read_synthetic(ev.synthetic, classes))
    records = [
        r
        for r in real_records(cfg.data.root, cfg.data.layout, cfg.data.split, cfg.data.skip_bad)
        if r.label in classes
    ]
    splits = Counter(r.split for r in records)
    needed = [ev.train_split, *ev.held_out_splits] + ([ev.val_split] if ev.classifier.enabled else [])
    absent = [s for s in needed if not splits.get(s)]
    if absent:
        raise InputError(
            f"real data {cfg.data.root}: no images in split(s) {', '.join(absent)} "
            f"(present: {', '.join(f'{k} {v}' for k, v in sorted(splits.items()))}); "
            "see evaluate.train_split / val_split / held_out_splits"
        )
    train_recs = select(records, [ev.train_split])
    held_recs = select(records, ev.held_out_splits)

    lap("inputs")

    # 2. leakage guard
    guard = guard_held_out(
        held_recs,
        records,
        train_split=ev.train_split,
        adapter_dirs=ev.adapters,
        quality=cfg.quality,
        mode=ev.leakage,
    )
    if not guard.kept:
        raise InputError(
            "leakage guard: every held-out image was refused (trained on or duplicated); "
            "nothing left to evaluate against"
        )
    train, held = [item_of(r) for r in train_recs], [item_of(r) for r in guard.kept]
    val = [item_of(r) for r in select(records, [ev.val_split])]

    lap("leakage")

    # 3. features (one pass; everything below reuses them)
    f = ev.fid
    weights = resolve_weights(f.inception_weights, f.cache_dir)
    workers = f.workers
    if workers:
        import ray

        workers = workers if ray.is_initialized() else 0
    ext = FeatureExtractor(
        weights,
        f.cache_dir,
        f.inception_weights,
        device_name(f.device),
        f.batch_size,
        workers=workers,
        num_cpus=f.num_cpus,
        num_gpus=f.num_gpus,
    )
    all_real = [item_of(r) for r in records]
    sets = {"synthetic": synthetic, "real train": train, "real held-out": held}
    if f.paper_protocol:
        sets["paper: all real"] = all_real
    feats = ext.features_of_sets(sets)
    syn_f, train_f, held_f = feats["synthetic"], feats["real train"], feats["real held-out"]

    def rows_of(items: list[ImageItem], feats: np.ndarray, c: str | None) -> np.ndarray:
        return feats[[i for i, it in enumerate(items) if c is None or it.label == c]]

    lap("features")

    # 4. fidelity
    rows = [
        _fidelity_row(
            c, rows_of(synthetic, syn_f, c), rows_of(held, held_f, c), rows_of(train, train_f, c), f
        )
        for c in classes
    ]
    rows.append(_fidelity_row("all", syn_f, held_f, train_f, f))
    paper = None
    if f.paper_protocol:
        all_f = feats["paper: all real"]
        mixed = np.concatenate([train_f, syn_f])
        paper = compare(
            all_f,
            mixed,
            kid_subset=f.kid_subset_size,
            kid_subsets=f.kid_subsets,
            bootstrap=f.bootstrap,
            ci=f.ci,
            seed=f.seed,
        )
        paper.update(
            label="paper protocol: all real images vs real train + synthetic, all classes "
            "(real images on both sides inflate the similarity)",
            mix={"real": len(train), "synthetic": len(synthetic)},
        )
    fidelity = {
        "rows": rows,
        "paper_protocol": paper,
        "bootstrap": f.bootstrap,
        "ci_level": f.ci,
        "floor_draws": f.floor_draws,
        "held_out_splits": ev.held_out_splits,
        "floor_pool": ev.train_split,
    }

    lap("fidelity")

    # 5. memorization
    m = ev.memorization
    memo: dict[str, Any] = {"enabled": False}
    if m.enabled:
        memo = audit(
            synthetic,
            syn_f,
            train,
            train_f,
            held,
            held_f,
            ssim_size=m.ssim_size,
            near_copy_cosine=m.near_copy_cosine,
            near_copy_ssim=m.near_copy_ssim,
        )
        memo["enabled"] = True

    lap("memorization")

    # 6. classifier
    clf: dict[str, Any] = {"enabled": False}
    if ev.classifier.enabled:
        import ray

        if not ray.is_initialized():
            raise RuntimeError(
                "classifier experiments run as Ray tasks: connect to Ray first "
                "(busdiff.raycluster.connect), or set evaluate.classifier.enabled=false"
            )
        clf = run_experiments(ClassifierInputs(train, val, held, synthetic), ev.classifier, classes)
        clf["enabled"] = True

    lap("classifier")

    # 7. outputs
    s = ext.stats
    metrics: dict[str, Any] = {
        "busdiff_version": package_versions()["busdiff"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {
            "synthetic": {"root": str(ev.synthetic), "n": len(synthetic), "per_class": _by_class(synthetic)},
            "real": {
                "root": str(cfg.data.root),
                "layout": cfg.data.layout,
                "n": len(records),
                "splits": dict(sorted(Counter(r.split or "none" for r in records).items())),
            },
            "train": {"split": ev.train_split, "n": len(train), "per_class": _by_class(train)},
            "held_out": {"splits": ev.held_out_splits, "n": len(held), "per_class": _by_class(held)},
        },
        "leakage": {**guard.to_dict(), "mode": ev.leakage},
        "features": {
            "extractor": s.extractor_id,
            "weights": s.weights_source,
            "weights_sha256": weights.sha256,
            "cache_dir": f.cache_dir,
            "computed": s.n_computed,
            "cached": s.n_cached,
            "seconds": round(s.seconds, 2),
            "extract_seconds": round(s.extract_seconds, 2),
            "images_per_s": None if s.images_per_s is None else round(s.images_per_s, 2),
            "per_set": s.per_set,
            "workers": workers,
        },
        "fidelity": fidelity,
        "memorization": memo,
        "classifier": clf,
    }
    grid = sample_grid(synthetic, held, classes, ev.grid_per_class)
    lap("report")
    metrics["timings"] = timings
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    html_text = render_html(metrics, grid, m.max_shown)

    out = ev.out.rstrip("/")
    write_text(f"{out}/config.yaml", dump_config(cfg))
    write_text(f"{out}/versions.json", json.dumps(package_versions(), indent=2) + "\n")
    inputs = {
        "synthetic": [{"id": it.id, "sha256": it.sha256} for it in synthetic],
        "real": [{"id": r.id, "split": r.split, "sha256": r.sha256} for r in records],
        "inception_weights_sha256": weights.sha256,
    }
    write_text(f"{out}/inputs.json", json.dumps(inputs, indent=1) + "\n")
    write_bytes(f"{out}/samples.png", png_bytes(grid))
    metrics_path = write_text(
        f"{out}/metrics.json", json.dumps(metrics, indent=2, default=_json_default) + "\n"
    )
    report_path = write_text(f"{out}/report.html", html_text)
    return EvaluateResult(out, metrics_path, report_path, metrics, time.perf_counter() - t0)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """A short text summary for the CLI and the job's log."""
    lines = ["class      n_syn  n_held    FID  [CI]              floor FID     KID       floor KID"]
    for r in metrics["fidelity"]["rows"]:
        if r.get("skipped"):
            lines.append(
                f"{r['class']:<10} {r['n_synthetic']:>5} {r['n_held_out']:>7}  skipped: {r['skipped']}"
            )
            continue
        s, fl = r["synthetic_vs_held_out"], r["floor"]
        ci = f"[{s['fid_ci'][0]:.1f}, {s['fid_ci'][1]:.1f}]" if s["fid_ci"] else "-"
        lines.append(
            f"{r['class']:<10} {s['n_a']:>5} {s['n_b']:>7} {s['fid']:>6.1f}  {ci:<17} {fl['fid']:>8.1f} "
            f"{s['kid']:>9.4f} {fl['kid']:>10.4f}"
        )
    p = metrics["fidelity"].get("paper_protocol")
    if p:
        lines.append(
            f"paper protocol (all real vs real+synthetic, all classes): "
            f"FID {p['fid']:.1f}, KID {p['kid']:.4f}"
        )
    lk = metrics["leakage"]["refused"]
    if lk:
        lines.append(
            f"leakage guard refused {len(lk)} held-out image(s): " + ", ".join(x["id"] for x in lk[:10])
        )
    mem = metrics["memorization"]
    if mem.get("enabled"):
        lines.append(
            f"memorization: {mem['n_near_copies']} near-copies of {mem['synthetic']['cosine']['n']} "
            "synthetic images"
        )
    clf = metrics["classifier"]
    if clf.get("enabled"):
        for s in clf["summary"]:
            ba = s["balanced_accuracy"]
            lines.append(
                f"classifier ratio {s['ratio']:g}: balanced accuracy {ba['mean'] or float('nan'):.3f}"
                f" ± {ba['std'] or 0:.3f} ({s['n_ok']} ok, {s['n_failed']} failed)"
            )
    return lines

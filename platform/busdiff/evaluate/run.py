"""``run_evaluate(cfg)``: the evaluation stage from inputs to metrics.json and report.html.

1. Read the synthetic folder and the real data (``cfg.data``); check splits and classes before any work.
2. Leakage guard on the held-out real images (:mod:`busdiff.evaluate.leakage`).
3. Inception features of every image through the content-keyed cache (misses as Ray tasks).
4. FID/KID per class and for all classes, each with its bootstrap interval and the matched-size
   real-vs-real floor; the paper's protocol beside them, labelled.
5. Memorization audit; 6. classifier experiments and (with image + mask pairs) the segmentation judge as
   Ray tasks; 7. metrics.json + report.html.

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

from busdiff.config import BusdiffConfig, FidelityConfig, dump_config
from busdiff.evaluate.classifier import ClassifierInputs, run_experiments
from busdiff.evaluate.features import ImageItem
from busdiff.evaluate.fidelity import FidelityError, compare, fidelity_row
from busdiff.evaluate.inputs import InputError, item_of
from busdiff.evaluate.judged import feature_extractor, judged_inputs
from busdiff.evaluate.memorization import audit
from busdiff.evaluate.report import png_bytes, render_html, sample_grid
from busdiff.evaluate.segmentation import corpus_pairs, run_segmentation
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


def _fidelity_row(
    label: str, syn: np.ndarray, held: np.ndarray, pool: np.ndarray, f: FidelityConfig
) -> dict[str, Any]:
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
        row.update(
            fidelity_row(
                syn,
                held,
                pool,
                nearest_k=f.nearest_k,
                kid_subset=f.kid_subset_size,
                kid_subsets=f.kid_subsets,
                bootstrap=f.bootstrap,
                floor_draws=f.floor_draws,
                ci=f.ci,
                seed=f.seed,
            )
        )
    except FidelityError as e:
        row["skipped"] = str(e)
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

    # 1-2. inputs, checked before any expensive work, and the leakage guard (busdiff.evaluate.judged)
    j = judged_inputs(cfg, {"synthetic": ev.synthetic}, ev.adapters)
    records, train, val, held, guard = j.records, j.train, j.val, j.held, j.guard
    synthetic, synthetic_refused = j.synthetic["synthetic"], j.synthetic_refused["synthetic"]
    provenance = j.provenance["synthetic"]
    pairs = None
    if ev.segmentation.enabled:  # the judged images' masks, checked before any expensive work
        pairs = corpus_pairs(ev.synthetic, synthetic)

    lap("inputs and leakage")

    # 3. features (one pass; everything below reuses them)
    f = ev.fid
    ext, weights, workers = feature_extractor(f)
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
        mixed = np.concatenate([all_f, syn_f])  # the authors' notebooks: all 780 real + the synthetic
        # no interval: a flawed protocol, shown only beside published figures (its bootstrap would cost
        # as much as all rows together)
        paper = compare(
            all_f, mixed, kid_subset=f.kid_subset_size, kid_subsets=f.kid_subsets, bootstrap=0, seed=f.seed
        )
        paper.update(
            label="paper protocol: all real images vs all real images + synthetic, all classes "
            "(the same real images on both sides inflate the similarity)",
            mix={"real": len(all_f), "synthetic": len(synthetic)},
        )
    fidelity = {
        "rows": rows,
        "paper_protocol": paper,
        "bootstrap": f.bootstrap,
        "ci_level": f.ci,
        "floor_draws": f.floor_draws,
        "nearest_k": f.nearest_k,
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
        # inception-frozen reads the features above (and val's) through the same extractor's cache
        clf = run_experiments(ClassifierInputs(train, val, held, synthetic), ev.classifier, classes, ext)
        clf["enabled"] = True

    lap("classifier")

    # 6b. segmentation judge (image + mask pairs of a ControlNet corpus)
    seg: dict[str, Any] = {"enabled": False}
    if pairs is not None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("the segmentation judge runs as Ray tasks: connect to Ray first "
                               "(busdiff.raycluster.connect), or set evaluate.segmentation.enabled=false")
        by_id = {r.id: r for r in records}
        real = {"train": [by_id[it.id] for it in train], "val": [by_id[it.id] for it in val],
                "test": [by_id[it.id] for it in held]}
        seg = {**run_segmentation(real, {"synthetic": pairs}, ev.segmentation), "enabled": True}

    lap("segmentation")

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
            "val": {"split": ev.val_split, "n": len(val), "per_class": _by_class(val)},
        },
        "leakage": {
            **guard.to_dict(),
            "synthetic_refused": synthetic_refused,
            "provenance": provenance.to_dict() if provenance else None,
            "mode": ev.leakage,
        },
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
        "segmentation": seg,
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


def _ci_text(ci: list[float] | None, fmt: str) -> str:
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "-"


def _prdc_text(side: dict[str, Any]) -> str:
    if side.get("precision") is None:
        return "-"
    return "/".join(f"{side[k]:.2f}" for k in ("precision", "recall", "density", "coverage"))


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """A short text summary for the CLI and the job's log."""
    lines = [
        "class      n_syn n_held    FID  floor  FID-floor [CI]          KID-floor [CI]               "
        "P(syn better) FID/KID  prec/rec/dens/cov (floor)"
    ]
    for r in metrics["fidelity"]["rows"]:
        if r.get("skipped"):
            lines.append(
                f"{r['class']:<10} {r['n_synthetic']:>5} {r['n_held_out']:>6}  skipped: {r['skipped']}"
            )
            continue
        s, fl, vs = r["synthetic_vs_held_out"], r["floor"], r["vs_floor"]
        better = vs["p_synthetic_better"] or {}
        p_text = "/".join("-" if better.get(k) is None else f"{better[k]:.2f}" for k in ("fid", "kid"))
        lines.append(
            f"{r['class']:<10} {s['n_a']:>5} {s['n_b']:>6} {s['fid']:>6.1f} {fl['fid']:>6.1f} "
            f"{vs['fid_diff']:>+6.1f} {_ci_text(vs['fid_diff_ci'], '+.1f'):<16} "
            f"{vs['kid_diff']:>+8.4f} {_ci_text(vs['kid_diff_ci'], '+.4f'):<20} {p_text:<21} "
            f"{_prdc_text(s)} ({_prdc_text(fl)})"
        )
    p = metrics["fidelity"].get("paper_protocol")
    if p:
        lines.append(
            f"paper protocol (all real vs real+synthetic, all classes): "
            f"FID {p['fid']:.1f}, KID {p['kid']:.4f}"
        )
    for key, what in (("refused", "held-out/val image(s)"), ("synthetic_refused", "synthetic image(s)")):
        lk = metrics["leakage"].get(key) or []
        if lk:
            lines.append(f"leakage guard refused {len(lk)} {what}: " + ", ".join(x["id"] for x in lk[:10]))
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
                f"classifier {s['arm']}: balanced accuracy {ba['mean'] or float('nan'):.3f}"
                f" ± {ba['std'] or 0:.3f} ({s['n_ok']} ok, {s['n_failed']} failed)"
            )
    return lines

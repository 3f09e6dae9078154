"""study.json: the stages' own outputs (each configuration's metrics.json, the classifier result) joined into
one table of configurations. Only reads and re-arranges: every figure was computed by a stage."""

from __future__ import annotations

import json
from typing import Any

from busdiff.config import CLASSES, BusdiffConfig
from busdiff.storage import read_bytes
from busdiff.study.plan import StudyPlan

KEYS = ("benign", "malignant", "normal", "all")
FIDELITY = ("fid", "kid", "precision", "recall", "density", "coverage")

# Published figures, under other protocols than busdiff's (REFERENCE.md): shown beside, never compared.
PUBLISHED = {
    "paper": {
        "source": "arXiv:2603.26834 (ISBI 2026)",
        "fid": {"lora_ti (text2img)": 45.97, "lora_ti_refined (hybrid)": 33.29},
        "workshop_classifier": {"accuracy": [0.904, 0.917], "macro_f1": [0.887, 0.904], "auc": 0.985},
        "protocol": "adapters trained on all 780 images, no test split, one seed",
    },
    "authors_notebooks": {
        "source": "github farhanfuadabir/hybrid_diffusion_ultrasound",
        "fid": {"lora": 42.18, "lora_ti": 42.24, "lora_ti_controlnet": 46.16,
                "lora_ti_controlnet_refined": 40.58},
        "protocol": "780 real images vs a folder of all 780 real plus 427 synthetic, all classes",
    },
}


def _read_json(path: str) -> dict[str, Any]:
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(f"{path}: no such file (its stage's record exists: was it deleted?)")
    return json.loads(data)


def floor_key(k: str) -> str:
    """study.json's name of the real-vs-real floor of figure ``k``: ``floor`` for FID, else ``<k>_floor``."""
    return "floor" if k == "fid" else f"{k}_floor"


def _fidelity(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_synthetic": {}, "n_held_out": {}, "skipped": {}, "fid_ci": {}, "vs_floor": {}}
    out.update({k: {} for k in FIDELITY} | {floor_key(k): {} for k in FIDELITY})
    for row in metrics["fidelity"]["rows"]:
        c = row["class"]
        out["n_synthetic"][c], out["n_held_out"][c] = row["n_synthetic"], row["n_held_out"]
        if row.get("skipped"):
            out["skipped"][c] = row["skipped"]
            continue
        syn, fl = row["synthetic_vs_held_out"], row["floor"]
        for k in FIDELITY:
            out[k][c], out[floor_key(k)][c] = syn.get(k), fl.get(k)
        out["fid_ci"][c] = syn.get("fid_ci")
        if row.get("vs_floor"):
            out["vs_floor"][c] = row["vs_floor"]
    paper = metrics["fidelity"].get("paper_protocol")
    out["authors_protocol_fid"] = paper and paper.get("fid")
    return out


def _memorization(metrics: dict[str, Any]) -> dict[str, Any] | None:
    m = metrics.get("memorization") or {}
    if not m.get("enabled"):
        return None
    return {"n_near_copies": m.get("n_near_copies"), "synthetic": m.get("synthetic"),
            "real_baseline": m.get("real_baseline")}


def _segmentation(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The segmentation judge's rows (real only, then each ratio) of a ControlNet configuration."""
    seg = metrics.get("segmentation") or {}
    if not seg.get("enabled"):
        return None
    return {"rows": seg["summary"], "n_real": seg["n_real"], "n_failed": seg["n_failed"]}


def join_results(plan: StudyPlan, cfg: BusdiffConfig) -> dict[str, Any]:
    """study.json's content; see the module docstring."""
    clf = None
    if plan.classifier is not None:
        clf = _read_json(f"{plan.classifier.out}/classifier.json")
    rows = []
    for arm in plan.arms:
        row: dict[str, Any] = {"name": arm.name, "synthetic": arm.synthetic, "adapter": arm.adapter,
                               "images": arm.images}
        if arm.synthetic:
            metrics_path = f"{plan.runs[arm.evaluate].out}/metrics.json"
            metrics = _read_json(metrics_path)
            row.update(_fidelity(metrics))
            row["memorization"] = _memorization(metrics)
            row["segmentation"] = _segmentation(metrics)
            leak = metrics["leakage"]
            row["leakage"] = {k: len(leak.get(k) or []) for k in ("refused", "synthetic_refused")}
            row["metrics"] = metrics_path
            row["evaluate_report"] = f"{plan.runs[arm.evaluate].out}/report.html"
        if clf is not None:
            row["classifier"] = (clf.get("sets") or {}).get(arm.name) if arm.synthetic else clf.get("real")
        rows.append(row)
    return {
        "configurations": rows,
        "classes": list(CLASSES),
        "base_model": cfg.model.preset if cfg.model.preset != "pretrained" else cfg.model.base,
        "data": cfg.data.root,
        "held_out_splits": cfg.evaluate.held_out_splits,
        "classifier": None if clf is None else {k: v for k, v in clf.items() if k not in ("sets", "real")},
        "stages": {r.id: {"out": r.out, "arms": r.arms} for r in plan.runs.values()},
        "published": PUBLISHED,
    }

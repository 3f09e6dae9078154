"""Downstream classifier experiments: does adding synthetic images help a classifier on real test data?

A timm model (resnet18 by default) is trained on the real train split alone (ratio 0) and on the real
train split plus ``ratio x`` as many synthetic images (drawn per class in the real class proportions),
for several seeds. The epoch with the best validation score (``select_metric``) is kept and scored once on
the test split. Each (ratio, seed) run is one Ray task with the configured CPUs/GPUs; a crashed run is
retried ``max_retries`` times and then reported as failed with its error, never dropped.

Images are decoded and resized once in the driver and shared with every run through the object store,
so workers need no access to the image files.
"""

from __future__ import annotations

import copy
import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from busdiff.config import ClassifierConfig
from busdiff.evaluate.features import ImageItem, read_rgb

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
MALIGNANT = "malignant"


# --------------------------------------------------------------------------------------------------
# metrics


def binary_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC of binary labels ``y`` (1 = positive) by the Mann-Whitney rank sum (ties averaged);
    None when one of the two classes is absent."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class recall/precision, one-vs-rest AUC (and their
    mean), malignant sensitivity and specificity; classes absent from ``y_true`` get None."""
    y_true = np.asarray(y_true, dtype=int)
    pred = np.asarray(probs).argmax(axis=1)
    recall, precision, f1, auc = {}, {}, {}, {}
    for k, c in enumerate(classes):
        tp = int(((pred == k) & (y_true == k)).sum())
        n_true, n_pred = int((y_true == k).sum()), int((pred == k).sum())
        recall[c] = tp / n_true if n_true else None
        precision[c] = tp / n_pred if n_pred else (None if not n_true else 0.0)
        p, r = precision[c] or 0.0, recall[c] or 0.0
        f1[c] = (2 * p * r / (p + r) if p + r else 0.0) if n_true else None
        auc[c] = binary_auc(y_true == k, probs[:, k])
    present = [c for c in classes if recall[c] is not None]
    aucs = [auc[c] for c in classes if auc[c] is not None]
    out: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": float((pred == y_true).mean()) if len(y_true) else None,
        "balanced_accuracy": float(np.mean([recall[c] for c in present])) if present else None,
        "macro_f1": float(np.mean([f1[c] for c in present])) if present else None,
        "auc_macro": float(np.mean(aucs)) if aucs else None,
        "recall": recall,
        "precision": precision,
        "auc": auc,
    }
    if MALIGNANT in classes:
        k = list(classes).index(MALIGNANT)
        pos, neg = y_true == k, y_true != k
        out["malignant_sensitivity"] = float((pred[pos] == k).mean()) if pos.any() else None
        out["malignant_specificity"] = float((pred[neg] != k).mean()) if neg.any() else None
    return out


# --------------------------------------------------------------------------------------------------
# data


def load_images(items: Sequence[ImageItem], size: int) -> np.ndarray:
    """``(N, size, size, 3)`` uint8, bilinear-resized (mixed sizes and modes accepted)."""
    out = np.zeros((len(items), size, size, 3), dtype=np.uint8)
    for i, it in enumerate(items):
        im = Image.fromarray(read_rgb(it.path)).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(im)
    return out


def synthetic_subset(
    real_counts: dict[str, int], synthetic: dict[str, list[int]], ratio: float, seed: int
) -> tuple[list[int], dict[str, Any]]:
    """Indices of ``ratio x real_counts[c]`` synthetic images per class (seeded draw without replacement);
    a class with too few is used whole and the shortfall noted."""
    rng = np.random.default_rng([seed, int(round(ratio * 1000))])
    chosen: list[int] = []
    notes: dict[str, Any] = {"requested": {}, "used": {}, "short": []}
    for c, n_real in real_counts.items():
        want = int(round(ratio * n_real))
        pool = synthetic.get(c, [])
        take = min(want, len(pool))
        notes["requested"][c] = want
        notes["used"][c] = take
        if take < want:
            notes["short"].append(f"{c}: {want} requested, {len(pool)} available")
        if take:
            chosen += [pool[i] for i in sorted(rng.choice(len(pool), take, replace=False))]
    return chosen, notes


# --------------------------------------------------------------------------------------------------
# one run


def _load_pretrained(model: torch.nn.Module, path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise ValueError(f"classifier.pretrained={path}: only .safetensors weights are loaded")
    state = load_file(str(p))
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in fits)
    if not fits:
        raise ValueError(f"classifier.pretrained={path}: no tensor matches the model's layers")
    model.load_state_dict(fits, strict=False)
    return {
        "file": str(p),
        "loaded": len(fits),
        "skipped": skipped[:20],
        "n_skipped": len(skipped),
        "reinitialised": sorted(k for k in own if k not in fits and "num_batches_tracked" not in k)[:20],
    }


def _to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.tensor(batch).permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - _MEAN) / _STD).to(device)


def _predict(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            out.append(
                torch.softmax(model(_to_input(images[s : s + batch], device)), 1).float().cpu().numpy()
            )
    return np.concatenate(out) if out else np.zeros((0, 0))


def train_run(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Train one (ratio, seed) classifier and score it; the body of a Ray task (also callable directly).

    ``arrays``: ``train_x/train_y/val_x/val_y/test_x/test_y`` (uint8 NHWC, int labels) and ``syn_x/syn_y``;
    ``spec``: model, pretrained, epochs, batch_size, lr, seed, ratio, classes, select_metric, device,
    threads and ``syn_index`` (the synthetic images of this run)."""
    import timm

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, int(spec["threads"])))
    torch.manual_seed(spec["seed"])
    rng = np.random.default_rng(spec["seed"])
    dev = spec["device"]
    device = torch.device(
        "cuda" if dev == "auto" and torch.cuda.is_available() else "cpu" if dev == "auto" else dev
    )
    classes = spec["classes"]
    idx = np.asarray(spec["syn_index"], dtype=int)
    x = np.concatenate([arrays["train_x"], arrays["syn_x"][idx]]) if len(idx) else arrays["train_x"]
    y = np.concatenate([arrays["train_y"], arrays["syn_y"][idx]]) if len(idx) else arrays["train_y"]

    model = timm.create_model(spec["model"], pretrained=False, num_classes=len(classes))
    init = {"kind": "random"}
    if spec.get("pretrained"):
        init = {"kind": "pretrained", **_load_pretrained(model, spec["pretrained"])}
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    loss_fn = torch.nn.CrossEntropyLoss()
    bs = spec["batch_size"]
    best, best_state, best_epoch, curve = -math.inf, None, -1, []
    for epoch in range(spec["epochs"]):
        model.train()
        order = rng.permutation(len(x))
        losses = []
        for s in range(0, len(order), bs):
            sel = order[s : s + bs]
            if len(sel) < 2 and len(order) > 1:  # BatchNorm cannot train on a batch of one
                continue
            batch = x[sel]
            flip = rng.random(len(sel)) < 0.5
            batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
            xb, yb = (
                _to_input(np.ascontiguousarray(batch), device),
                torch.from_numpy(y[sel]).long().to(device),
            )
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        val = classification_metrics(arrays["val_y"], _predict(model, arrays["val_x"], device, bs), classes)
        score = val[spec["select_metric"]]
        score = -math.inf if score is None else score
        curve.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)) if losses else None,
                "val": val[spec["select_metric"]],
            }
        )
        if score > best:
            best, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    test = classification_metrics(arrays["test_y"], _predict(model, arrays["test_x"], device, bs), classes)
    return {
        "ratio": spec["ratio"],
        "seed": spec["seed"],
        "status": "ok",
        "n_train_real": len(arrays["train_y"]),
        "n_train_synthetic": int(len(idx)),
        "best_epoch": best_epoch,
        "val_best": None if best == -math.inf else best,
        "curve": curve,
        "test": test,
        "init": init,
        "device": str(device),
        "seconds": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------------------------------
# experiments on Ray

SCALARS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auc_macro",
    "malignant_sensitivity",
    "malignant_specificity",
)


@dataclass
class ClassifierInputs:
    train: list[ImageItem]
    val: list[ImageItem]
    test: list[ImageItem]
    synthetic: list[ImageItem]


def _labels(items: Sequence[ImageItem], classes: Sequence[str]) -> np.ndarray:
    return np.array([list(classes).index(it.label) for it in items], dtype=np.int64)


def _paired(runs: list[dict], ratio: float, metric: str) -> dict[str, Any] | None:
    from scipy.stats import ttest_rel

    base = {r["seed"]: r["test"].get(metric) for r in runs if r["ratio"] == 0 and r["status"] == "ok"}
    other = {r["seed"]: r["test"].get(metric) for r in runs if r["ratio"] == ratio and r["status"] == "ok"}
    seeds = sorted(s for s in base if s in other and base[s] is not None and other[s] is not None)
    if not seeds:
        return None
    d = np.array([other[s] - base[s] for s in seeds])
    out = {
        "n_pairs": len(seeds),
        "mean_diff": float(d.mean()),
        "std_diff": float(d.std(ddof=1)) if len(d) > 1 else None,
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "p_value": None,
    }
    if len(d) > 1 and d.std() > 0:
        out["p_value"] = float(ttest_rel([other[s] for s in seeds], [base[s] for s in seeds]).pvalue)
    return out


def summarize(runs: list[dict], ratios: Sequence[float], classes: Sequence[str]) -> list[dict[str, Any]]:
    """Mean +/- std over seeds per ratio, per-class recall means, and the paired difference to ratio 0."""
    rows = []
    for ratio in ratios:
        ok = [r for r in runs if r["ratio"] == ratio and r["status"] == "ok"]
        row: dict[str, Any] = {
            "ratio": ratio,
            "n_ok": len(ok),
            "n_failed": sum(r["ratio"] == ratio and r["status"] != "ok" for r in runs),
            "n_synthetic": sorted({r["n_train_synthetic"] for r in ok}),
        }
        for m in SCALARS:
            vals = [r["test"].get(m) for r in ok if r["test"].get(m) is not None]
            row[m] = {
                "mean": float(np.mean(vals)) if vals else None,
                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            }
            if ratio != 0:
                row.setdefault("vs_real_only", {})[m] = _paired(runs, ratio, m)
        row["recall"] = {
            c: (
                float(np.mean(v))
                if (v := [r["test"]["recall"][c] for r in ok if r["test"]["recall"][c] is not None])
                else None
            )
            for c in classes
        }
        rows.append(row)
    return rows


def run_experiments(
    inputs: ClassifierInputs, cfg: ClassifierConfig, classes: Sequence[str]
) -> dict[str, Any]:
    """Every (ratio, seed) run as a Ray task (the caller has connected to Ray); plain JSON result."""
    import ray

    classes = list(classes)
    for name, items in (("train", inputs.train), ("val", inputs.val), ("test", inputs.test)):
        if not items:
            raise ValueError(f"classifier: the real {name} split is empty")
    if cfg.pretrained and not Path(cfg.pretrained).expanduser().is_file():
        raise ValueError(f"evaluate.classifier.pretrained={cfg.pretrained}: no such file")
    t0 = time.perf_counter()
    size = cfg.image_size
    arrays = {
        "train_x": load_images(inputs.train, size),
        "train_y": _labels(inputs.train, classes),
        "val_x": load_images(inputs.val, size),
        "val_y": _labels(inputs.val, classes),
        "test_x": load_images(inputs.test, size),
        "test_y": _labels(inputs.test, classes),
        "syn_x": load_images(inputs.synthetic, size),
        "syn_y": _labels(inputs.synthetic, classes),
    }
    load_s = time.perf_counter() - t0
    arrays_ref = ray.put(arrays)
    real_counts = {c: int((arrays["train_y"] == k).sum()) for k, c in enumerate(classes)}
    syn_by_class = {c: [i for i, it in enumerate(inputs.synthetic) if it.label == c] for c in classes}

    task = ray.remote(_task).options(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_retries=cfg.max_retries, retry_exceptions=True
    )
    launched = []
    for ratio in cfg.ratios:
        for seed in cfg.seeds:
            index, notes = synthetic_subset(real_counts, syn_by_class, ratio, seed)
            spec = {
                "model": cfg.model,
                "pretrained": cfg.pretrained,
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "seed": seed,
                "ratio": ratio,
                "classes": classes,
                "select_metric": cfg.select_metric,
                "device": cfg.device,
                "threads": max(1, int(cfg.num_cpus)),
                "syn_index": index,
            }
            launched.append((spec, notes, task.remote(spec, arrays_ref)))
    runs = []
    for spec, notes, ref in launched:
        try:
            res = ray.get(ref)
        except Exception as e:  # retries exhausted (or the worker died): report it, never drop it
            res = {
                "ratio": spec["ratio"],
                "seed": spec["seed"],
                "status": "failed",
                "attempts": cfg.max_retries + 1,
                "error": f"{type(e).__name__}: {str(e)[-2000:]}",
                "n_train_synthetic": len(spec["syn_index"]),
            }
        res["synthetic_draw"] = notes
        runs.append(res)
    wall = time.perf_counter() - t0
    ok = [r for r in runs if r["status"] == "ok"]
    return {
        "config": cfg.model_dump(mode="json"),
        "classes": classes,
        "init": ok[0]["init"] if ok else None,
        "n_real": {"train": len(inputs.train), "val": len(inputs.val), "test": len(inputs.test)},
        "n_synthetic_available": {c: len(v) for c, v in syn_by_class.items()},
        "runs": runs,
        "n_failed": len(runs) - len(ok),
        "summary": summarize(runs, cfg.ratios, classes),
        "timing": {
            "load_s": round(load_s, 2),
            "wall_s": round(wall, 2),
            "sum_run_s": round(sum(r.get("seconds", 0) for r in ok), 2),
        },
    }


def _task(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    try:
        return train_run(spec, arrays)
    except Exception as e:
        # Re-raise with the traceback text so the driver's report says where it broke.
        raise RuntimeError(
            f"run ratio={spec['ratio']} seed={spec['seed']} failed: {e}\n{traceback.format_exc(limit=5)}"
        ) from None

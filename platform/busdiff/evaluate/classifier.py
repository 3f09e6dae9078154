"""Downstream classifier experiments: does adding synthetic images help a classifier on real test data?

A classifier is trained on the real train split alone (real only) and on the real train split plus
synthetic images, for several seeds. Two protocols say how many synthetic images: ``ratios`` (``ratio x``
as many as real ones, drawn per class in the real class proportions) and ``topup`` (the authors': each
class topped up to ``topup_per_class`` training images). The epoch with the best validation score
(``select_metric``) is kept and scored once on the test split, and each arm is paired by seed with real
only. Several named synthetic sets (the study's configurations) are judged at once: every run of every
set is one Ray task with the configured CPUs/GPUs, all launched together, and the real-only runs are
shared by all sets (launched once). A crashed run is retried ``max_retries`` times and then reported as
failed with its error, never dropped.

Models: a timm model (resnet18 by default; random init or local ``.safetensors`` weights), or
``inception-frozen``: a linear/MLP head on the 2048-d pool3 features of the FID Inception network,
which is ImageNet-trained and loads offline. Those features come from the evaluation's content-keyed
feature cache, so they cost no network pass where FID already ran; they are of the unflipped images
(no flip augmentation for the head).

Images (or features) are prepared once in the driver and shared with every run through the object
store, so workers need no access to the image files.
"""

from __future__ import annotations

import copy
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from busdiff.config import ClassifierConfig
from busdiff.evaluate.features import FeatureExtractor, ImageItem, read_rgb

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
MALIGNANT = "malignant"
REAL_ONLY = "real-only"  # the arm of the shared real-only runs (set None)
DEFAULT_SET = "synthetic"  # the name of a single synthetic set given as a list
PROTOCOLS = {
    "ratios": "real train + ratio x as many synthetic images, drawn per class in the real class "
    "proportions; model picked on val, scored on test",
    "topup": "the authors' protocol: real train topped up with synthetic images to {n} per class, model "
    "picked on val (scored here on a separate test split, several seeds; the authors reported on the "
    "val images they selected on, one seed)",
}


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


def _draw(
    wants: dict[str, int], pools: dict[str, list[int]], rng: np.random.Generator
) -> tuple[list[int], dict[str, Any]]:
    """``wants[c]`` of ``pools[c]`` per class (seeded, without replacement); a class with too few is used
    whole and the shortfall noted."""
    chosen: list[int] = []
    notes: dict[str, Any] = {"requested": {}, "used": {}, "short": []}
    for c, want in wants.items():
        pool = pools.get(c, [])
        take = min(want, len(pool))
        notes["requested"][c] = want
        notes["used"][c] = take
        if take < want:
            notes["short"].append(f"{c}: {want} requested, {len(pool)} available")
        if take:
            chosen += [pool[i] for i in sorted(rng.choice(len(pool), take, replace=False))]
    return chosen, notes


def synthetic_subset(
    real_counts: dict[str, int], synthetic: dict[str, list[int]], ratio: float, seed: int
) -> tuple[list[int], dict[str, Any]]:
    """Indices of ``ratio x real_counts[c]`` synthetic images per class (seeded draw without replacement);
    a class with too few is used whole and the shortfall noted."""
    rng = np.random.default_rng([seed, int(round(ratio * 1000))])
    return _draw({c: int(round(ratio * n)) for c, n in real_counts.items()}, synthetic, rng)


def topup_subset(
    real_counts: dict[str, int], synthetic: dict[str, list[int]], per_class: int, seed: int
) -> tuple[list[int], dict[str, Any]]:
    """The authors' protocol: synthetic indices topping each class up to ``per_class`` training images
    (real images are never dropped: a class with as many gets none). ``notes["total"]``: real + synthetic
    per class, ``per_class`` unless ``notes["short"]`` says why not."""
    rng = np.random.default_rng([seed, per_class, 1])
    chosen, notes = _draw({c: max(0, per_class - n) for c, n in real_counts.items()}, synthetic, rng)
    notes["total"] = {c: n + notes["used"][c] for c, n in real_counts.items()}
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


# A batch of ``arrays`` rows -> the model's input on the device; ``rng`` given = training (augment).
Prepare = Callable[[np.ndarray, torch.device, "np.random.Generator | None"], torch.Tensor]


def _images_in(
    batch: np.ndarray, device: torch.device, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """uint8 NHWC -> ImageNet-normalised NCHW; in training a random half is flipped horizontally."""
    if rng is not None:
        flip = rng.random(len(batch)) < 0.5
        batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
    x = torch.tensor(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - _MEAN) / _STD).to(device)


def _features_in(
    batch: np.ndarray, device: torch.device, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """Cached features as they are: no augmentation (flipped images' features are not cached)."""
    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)


class FeatureHead(torch.nn.Module):
    """The head of ``inception-frozen``: features standardised by the training set's mean and std (fixed
    buffers), then a linear layer, or one hidden ReLU layer of ``hidden`` units."""

    def __init__(self, train_x: np.ndarray, n_classes: int, hidden: int | None = None) -> None:
        super().__init__()
        x = torch.from_numpy(np.asarray(train_x, dtype=np.float32))
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("scale", x.std(0, correction=0).clamp_min(1e-6))
        d = x.shape[1]
        self.net: torch.nn.Module = (
            torch.nn.Linear(d, n_classes)
            if hidden is None
            else torch.nn.Sequential(
                torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.scale)


def _model(spec: dict[str, Any], train_x: np.ndarray) -> tuple[torch.nn.Module, dict[str, Any], Prepare]:
    """The model of ``spec`` (seeded by the caller), how it was initialised, and its input preparation."""
    n = len(spec["classes"])
    if spec["model"] == ClassifierConfig.FROZEN:
        if train_x.ndim != 2:
            raise ValueError("inception-frozen trains on feature arrays (N, 2048), got images")
        fields = ClassifierConfig.model_fields  # the config's defaults for specs without them
        head = spec.get("head", fields["head"].default)
        hidden = spec.get("head_hidden", fields["head_hidden"].default) if head == "mlp" else None
        init = {
            "kind": ClassifierConfig.FROZEN,
            "head": head,
            "hidden": hidden,
            **(spec.get("features") or {}),
        }
        return FeatureHead(train_x, n, hidden), init, _features_in
    import timm

    model = timm.create_model(spec["model"], pretrained=False, num_classes=n)
    init = {"kind": "random"}
    if spec.get("pretrained"):
        init = {"kind": "pretrained", **_load_pretrained(model, spec["pretrained"])}
    return model, init, _images_in


def _predict(
    model: torch.nn.Module, data: np.ndarray, device: torch.device, batch: int, prepare: Prepare
) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(data), batch):
            out.append(
                torch.softmax(model(prepare(data[s : s + batch], device, None)), 1).float().cpu().numpy()
            )
    return np.concatenate(out) if out else np.zeros((0, 0))


def train_run(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Train one classifier and score it; the body of a Ray task (also callable directly).

    ``arrays``: ``train_x/train_y/val_x/val_y/test_x/test_y`` and ``syn_x/syn_y`` (uint8 NHWC images, or
    ``(N, 2048)`` features for inception-frozen; int labels); ``spec``: model, pretrained, epochs,
    batch_size, lr, seed, ratio, classes, select_metric, device, threads and ``syn_index`` (the synthetic
    images of this run); optional head, head_hidden, weight_decay, features (its source, for the record)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec["threads"])))
    try:
        return {**_train_run(spec, arrays), "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(threads)  # the caller's count back when called in-process


def _train_run(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    t0 = time.perf_counter()
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

    model, init, prepare = _model(spec, x)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"], weight_decay=spec.get("weight_decay", 0.0))
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
            xb, yb = prepare(x[sel], device, rng), torch.from_numpy(y[sel]).long().to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        val = classification_metrics(
            arrays["val_y"], _predict(model, arrays["val_x"], device, bs, prepare), classes
        )
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
    test = classification_metrics(
        arrays["test_y"], _predict(model, arrays["test_x"], device, bs, prepare), classes
    )
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
    """The real splits and the synthetic images: one list, or several named sets judged together."""

    train: list[ImageItem]
    val: list[ImageItem]
    test: list[ImageItem]
    synthetic: list[ImageItem] | dict[str, list[ImageItem]]

    def synthetic_sets(self) -> dict[str, list[ImageItem]]:
        """``{name: images}``; a single list is the set named ``synthetic``."""
        if isinstance(self.synthetic, dict):
            return {str(k): list(v) for k, v in self.synthetic.items()}
        return {DEFAULT_SET: list(self.synthetic)}


def _labels(items: Sequence[ImageItem], classes: Sequence[str]) -> np.ndarray:
    return np.array([list(classes).index(it.label) for it in items], dtype=np.int64)


def paired_difference(base_runs: list[dict], runs: list[dict], metric: str) -> dict[str, Any] | None:
    """``runs``' test ``metric`` minus ``base_runs``' paired by seed (only seeds where both ran): mean and
    std of the differences, wins/losses, and the paired t-test's p-value; None without a pair."""
    from scipy.stats import ttest_rel

    base = {r["seed"]: r["test"].get(metric) for r in base_runs if r["status"] == "ok"}
    other = {r["seed"]: r["test"].get(metric) for r in runs if r["status"] == "ok"}
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


def summarize_by_arm(runs: list[dict], scalars: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (set, arm), in the order of ``runs``: mean +/- std over seeds of each test figure in
    ``scalars``, and (but for real only) ``vs_real_only``, the paired difference by seed to the shared
    real-only runs. Shared by the classifier and the segmentation judge."""
    groups: dict[tuple[str | None, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["set"], r["arm"]), []).append(r)
    base = groups.get((None, REAL_ONLY), [])
    rows = []
    for (name, arm), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        row: dict[str, Any] = {
            "set": name,
            "arm": arm,
            "ratio": group[0]["ratio"],
            "n_ok": len(ok),
            "n_failed": len(group) - len(ok),
            "n_synthetic": sorted({r["n_train_synthetic"] for r in ok}),
        }
        for m in scalars:
            vals = [r["test"].get(m) for r in ok if r["test"].get(m) is not None]
            row[m] = {
                "mean": float(np.mean(vals)) if vals else None,
                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            }
            if arm != REAL_ONLY:
                row.setdefault("vs_real_only", {})[m] = paired_difference(base, group, m)
        rows.append(row)
    return rows


def summarize(runs: list[dict], classes: Sequence[str]) -> list[dict[str, Any]]:
    """:func:`summarize_by_arm` of the classifier's figures, with each row's per-class recall means."""
    rows = summarize_by_arm(runs, SCALARS)
    for row in rows:
        ok = [r for r in runs if (r["set"], r["arm"]) == (row["set"], row["arm"]) and r["status"] == "ok"]
        row["recall"] = {
            c: (
                float(np.mean(v))
                if (v := [r["test"]["recall"][c] for r in ok if r["test"]["recall"][c] is not None])
                else None
            )
            for c in classes
        }
    return rows


def rows_of_set(result: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The summary rows one synthetic set is judged by: the shared real-only row, then its own."""
    return [r for r in result["summary"] if r["set"] in (None, name)]


def _plan(
    cfg: ClassifierConfig, real_counts: dict[str, int], pools: dict[str, dict[str, list[int]]]
) -> list[tuple[dict[str, Any], list[int], dict[str, Any]]]:
    """``(key, synthetic indices, draw notes)`` of every run: the real-only runs once (shared by every
    set), then each set's arms. A topup arm's ratio is its effective synthetic / real-train ratio."""
    n_real = max(1, sum(real_counts.values()))
    plan = []
    if cfg.protocol == "topup" or 0 in cfg.ratios:
        for seed in cfg.seeds:
            key = {"set": None, "arm": REAL_ONLY, "ratio": 0.0, "seed": seed}
            plan.append((key, *synthetic_subset(real_counts, {}, 0.0, seed)))
    arms: list[tuple[str, float | None]] = (
        [(f"topup {cfg.topup_per_class}", None)]
        if cfg.protocol == "topup"
        else [(f"ratio {r:g}", r) for r in cfg.ratios if r != 0]
    )
    for name, pool in pools.items():
        for arm, ratio in arms:
            for seed in cfg.seeds:
                index, notes = (
                    topup_subset(real_counts, pool, cfg.topup_per_class, seed)
                    if ratio is None
                    else synthetic_subset(real_counts, pool, ratio, seed)
                )
                eff = ratio if ratio is not None else round(len(index) / n_real, 4)
                plan.append(({"set": name, "arm": arm, "ratio": eff, "seed": seed}, index, notes))
    return plan


def _arrays(
    inputs: ClassifierInputs,
    synthetic: list[ImageItem],
    cfg: ClassifierConfig,
    classes: Sequence[str],
    extractor: FeatureExtractor | None,
) -> dict[str, np.ndarray]:
    """``<split>_x`` / ``<split>_y`` of train, val, test and syn (every set, concatenated): images at
    ``image_size``, or for inception-frozen their features through ``extractor``'s cache (one pass)."""
    splits = {"train": inputs.train, "val": inputs.val, "test": inputs.test, "syn": synthetic}
    if cfg.model == cfg.FROZEN:
        assert extractor is not None
        feats = extractor.features_of_sets({f"classifier {k}": v for k, v in splits.items()})
        xs = {k: feats[f"classifier {k}"] for k in splits}
    else:
        xs = {k: load_images(v, cfg.image_size) for k, v in splits.items()}
    return {
        **{f"{k}_x": x for k, x in xs.items()},
        **{f"{k}_y": _labels(v, classes) for k, v in splits.items()},
    }


# The config fields every run's spec carries.
_SPEC_FIELDS = {"model", "pretrained", "head", "head_hidden", "epochs", "batch_size", "lr", "device"}
_SPEC_FIELDS |= {"weight_decay", "select_metric"}


def run_experiments(
    inputs: ClassifierInputs,
    cfg: ClassifierConfig,
    classes: Sequence[str],
    extractor: FeatureExtractor | None = None,
) -> dict[str, Any]:
    """Every run of every synthetic set as a Ray task, all launched before any is awaited (the caller has
    connected to Ray); the real-only runs once, shared by all sets. ``extractor`` (needed by
    inception-frozen): the evaluation's feature extractor, whose cache already holds FID's features.
    Plain JSON result; ``summary`` has a row per (set, arm) (:func:`rows_of_set`)."""
    import ray

    classes = list(classes)
    sets = inputs.synthetic_sets()
    for name, items in (("train", inputs.train), ("val", inputs.val), ("test", inputs.test)):
        if not items:
            raise ValueError(f"classifier: the real {name} split is empty")
    if cfg.pretrained and not Path(cfg.pretrained).expanduser().is_file():
        raise ValueError(f"evaluate.classifier.pretrained={cfg.pretrained}: no such file")
    if cfg.model == cfg.FROZEN and extractor is None:
        raise ValueError(
            f"classifier.model={cfg.FROZEN} trains on cached Inception features: pass the FeatureExtractor"
        )
    t0 = time.perf_counter()
    arrays = _arrays(inputs, [it for items in sets.values() for it in items], cfg, classes, extractor)
    load_s = time.perf_counter() - t0
    arrays_ref = ray.put(arrays)
    real_counts = {c: int((arrays["train_y"] == k).sum()) for k, c in enumerate(classes)}
    pools, start = {}, 0
    for name, items in sets.items():  # indices into the concatenated syn arrays
        pools[name] = {c: [start + i for i, it in enumerate(items) if it.label == c] for c in classes}
        start += len(items)

    task = ray.remote(_task).options(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_retries=cfg.max_retries, retry_exceptions=True
    )
    common = {
        **cfg.model_dump(include=_SPEC_FIELDS),
        "classes": classes,
        "threads": max(1, int(cfg.num_cpus)),
        "features": (
            {"extractor": extractor.stats.extractor_id, "weights": extractor.weights.source}
            if cfg.model == cfg.FROZEN and extractor is not None
            else None
        ),
    }
    launched = [
        (key, index, notes, task.remote({**common, **key, "syn_index": index}, arrays_ref))
        for key, index, notes in _plan(cfg, real_counts, pools)
    ]
    runs = []
    for key, index, notes, ref in launched:
        try:
            res = ray.get(ref)
        except Exception as e:  # retries exhausted (or the worker died): report it, never drop it
            res = {
                "status": "failed",
                "attempts": cfg.max_retries + 1,
                "error": f"{type(e).__name__}: {str(e)[-2000:]}",
                "n_train_synthetic": len(index),
            }
        runs.append({**key, **res, "synthetic_draw": notes})
    wall = time.perf_counter() - t0
    ok = [r for r in runs if r["status"] == "ok"]
    return {
        "config": cfg.model_dump(mode="json"),
        "protocol": {
            "name": cfg.protocol,
            "label": PROTOCOLS[cfg.protocol].format(n=cfg.topup_per_class),
            **({"topup_per_class": cfg.topup_per_class} if cfg.protocol == "topup" else {}),
        },
        "classes": classes,
        "init": ok[0]["init"] if ok else None,
        "n_real": {"train": len(inputs.train), "val": len(inputs.val), "test": len(inputs.test)},
        "n_real_train_per_class": real_counts,
        "sets": list(sets),
        "n_synthetic_available": {n: {c: len(v) for c, v in p.items()} for n, p in pools.items()},
        "runs": runs,
        "n_failed": len(runs) - len(ok),
        "summary": summarize(runs, classes),
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
        where = f"set={spec.get('set')} arm={spec.get('arm')} ratio={spec['ratio']} seed={spec['seed']}"
        raise RuntimeError(f"run {where} failed: {e}\n{traceback.format_exc(limit=5)}") from None

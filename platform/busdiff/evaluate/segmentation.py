"""The segmentation judge: do synthetic image + mask pairs help a segmentation model on real test images?

A MONAI U-Net (``monai.networks.nets.UNet``, ``DiceLoss``) is trained on the real train split's image +
mask pairs alone (real only) and on those plus synthetic pairs (a ControlNet corpus: ``samples/`` with
``masks/``) at each ``ratio`` (ratio x as many synthetic pairs as real ones, drawn per class in the real
class proportions, as the classifier draws them), for several seeds. The epoch with the best val Dice (the
lesion images of benign and malignant) is kept and scored once on the test split: Dice and IoU per lesion
class (``DiceMetric`` / ``MeanIoU``), and for normal images (no lesion) the share with any predicted
lesion pixel. Every run is one Ray task, all launched together; the real-only runs are shared by every
synthetic set; each arm is paired by seed with real only. A crashed run is retried ``max_retries`` times,
then reported as failed with its error, never dropped.

Images (grayscale) and masks are read once in the driver at ``image_size`` and shared with every run
through the object store, so workers need no access to the files.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from busdiff.config import SegmentationConfig
from busdiff.data.busi import read_image, read_mask
from busdiff.data.records import ImageRecord
from busdiff.evaluate.classifier import REAL_ONLY, summarize_by_arm, synthetic_subset
from busdiff.evaluate.features import ImageItem

LESIONS = ("benign", "malignant")
_SPEC_FIELDS = {"channels", "num_res_units", "epochs", "batch_size", "lr", "threshold", "device"}


def pair_arrays(records: Sequence[ImageRecord], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images, masks)``: float32 N×1×size×size grayscale in [0, 1] and uint8 N×1×size×size in {0, 1}
    (the union of each record's mask files; none: an empty mask)."""
    xs, ys = [], []
    for r in records:  # local files or objects (busdiff.storage)
        image = read_image(r).convert("L").resize((size, size), Image.Resampling.BICUBIC)
        xs.append(np.asarray(image, dtype=np.float32) / 255)
        ys.append(read_mask(r, (size, size)) > 0)
    if not records:
        return np.zeros((0, 1, size, size), np.float32), np.zeros((0, 1, size, size), np.uint8)
    return np.stack(xs)[:, None], np.stack(ys)[:, None].astype(np.uint8)


def segmentation_metrics(pred: np.ndarray, true: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Flat scores of binary predictions (N×1×H×W) against masks: ``dice_<class>`` / ``iou_<class>`` (mean
    over that class's images with a lesion; MONAI's DiceMetric and MeanIoU), ``dice_lesion`` /
    ``iou_lesion`` over all of them, and ``normal_false_positive`` (share of normal images with any
    predicted lesion pixel; None without normal images)."""
    from monai.metrics import DiceMetric, MeanIoU

    labels = np.asarray(labels)
    p, t = torch.as_tensor(pred, dtype=torch.float32), torch.as_tensor(true, dtype=torch.float32)
    has = t.flatten(1).sum(1) > 0
    out: dict[str, Any] = {}
    dice = iou = torch.zeros(0)
    if has.any():
        dice = DiceMetric(include_background=True, reduction="none")(p[has], t[has]).flatten()
        iou = MeanIoU(include_background=True, reduction="none")(p[has], t[has]).flatten()
    lesion_labels = labels[has.numpy()]
    for c in LESIONS:
        k = torch.as_tensor(lesion_labels == c)
        out[f"dice_{c}"] = float(dice[k].mean()) if k.any() else None
        out[f"iou_{c}"] = float(iou[k].mean()) if k.any() else None
    out["dice_lesion"] = float(dice.mean()) if len(dice) else None
    out["iou_lesion"] = float(iou.mean()) if len(iou) else None
    normal = torch.as_tensor(labels == "normal")
    out["normal_false_positive"] = (float((p[normal].flatten(1).sum(1) > 0).float().mean())
                                    if normal.any() else None)
    out["n_lesion_images"] = int(has.sum())
    return out


SCALARS = ("dice_benign", "dice_malignant", "dice_lesion", "iou_benign", "iou_malignant", "iou_lesion",
           "normal_false_positive")


def _predict(model: torch.nn.Module, x: np.ndarray, threshold: float, device: torch.device) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for k in range(0, len(x), 64):
            logits = model(torch.as_tensor(x[k:k + 64]).to(device))
            out.append((torch.sigmoid(logits) > threshold).cpu().numpy())
    return np.concatenate(out) if out else np.zeros_like(x, dtype=bool)


def train_run(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """One run: real train (+ the synthetic pairs ``spec["syn_index"]``), best epoch by val lesion Dice,
    scored on test. Deterministic for a seed on one kind of machine."""
    from monai.losses import DiceLoss
    from monai.networks.nets import UNet

    t0 = time.perf_counter()
    torch.set_num_threads(spec.get("threads", 1))
    device = torch.device("cuda" if spec["device"] == "cuda" or (spec["device"] == "auto" and
                                                                torch.cuda.is_available()) else "cpu")
    idx = np.asarray(spec["syn_index"], dtype=np.int64)
    x = np.concatenate([arrays["train_x"], arrays["syn_x"][idx]])
    y = np.concatenate([arrays["train_y"], arrays["syn_y"][idx]]).astype(np.float32)
    gen = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    levels = len(spec["channels"])
    model = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(spec["channels"]),
                 strides=(2,) * (levels - 1), num_res_units=spec["num_res_units"]).to(device)
    loss_fn = DiceLoss(sigmoid=True, batch=True)  # batch Dice: a batch of normal (empty) masks is defined
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    best, best_state, best_epoch, history = -1.0, None, 0, []
    val_labels = [str(v) for v in arrays["val_labels"]]
    for epoch in range(1, spec["epochs"] + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen).numpy()
        for k in range(0, len(order), spec["batch_size"]):
            b = order[k:k + spec["batch_size"]]
            xb, yb = torch.as_tensor(x[b]), torch.as_tensor(y[b])
            flip = torch.rand(len(b), generator=gen) < 0.5  # horizontal flips, drawn from the run's seed
            xb[flip], yb[flip] = xb[flip].flip(-1), yb[flip].flip(-1)
            opt.zero_grad()
            loss = loss_fn(model(xb.to(device)), yb.to(device))
            loss.backward()
            opt.step()
        val = segmentation_metrics(_predict(model, arrays["val_x"], spec["threshold"], device),
                                   arrays["val_y"], val_labels)
        score = val["dice_lesion"] if val["dice_lesion"] is not None else 0.0
        history.append(round(score, 4))
        if score > best:
            best, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    test = segmentation_metrics(_predict(model, arrays["test_x"], spec["threshold"], device),
                                arrays["test_y"], [str(v) for v in arrays["test_labels"]])
    return {"status": "ok", "best_epoch": best_epoch, "val_dice_lesion": best, "val_history": history,
            "test": test, "n_train_real": len(arrays["train_x"]), "n_train_synthetic": len(idx),
            "seconds": round(time.perf_counter() - t0, 2), "device": device.type}


def _task(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    try:
        return train_run(spec, arrays)
    except Exception as e:
        where = f"set={spec.get('set')} ratio={spec['ratio']} seed={spec['seed']}"
        raise RuntimeError(f"segmentation run {where} failed: {e}\n{traceback.format_exc(limit=5)}") from None


def run_segmentation(real: dict[str, Sequence[ImageRecord]], synthetic: dict[str, Sequence[ImageRecord]],
                     cfg: SegmentationConfig) -> dict[str, Any]:
    """Every run as a Ray task (the caller has connected to Ray), all launched before any is awaited.
    ``real``: the ``train``, ``val`` and ``test`` records (with masks); ``synthetic``: named sets of image +
    mask records (``load_dataset(sink)``). Plain JSON result with ``runs`` and ``summary``."""
    import ray

    for split in ("train", "val", "test"):
        if not real.get(split):
            raise ValueError(f"segmentation: the real {split} split is empty")
    unmasked = [n for n, recs in synthetic.items() if any(not r.mask_paths for r in recs)]
    if unmasked:
        raise ValueError(f"segmentation: synthetic set(s) {', '.join(unmasked)} have images without masks: "
                         "judge a corpus generated with generate.controlnet (masks/ beside samples/)")
    t0 = time.perf_counter()
    size = cfg.image_size
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_x"], arrays[f"{split}_y"] = pair_arrays(real[split], size)
        arrays[f"{split}_labels"] = np.array([r.label for r in real[split]])
    syn = [r for recs in synthetic.values() for r in recs]
    arrays["syn_x"], arrays["syn_y"] = pair_arrays(syn, size)
    load_s = time.perf_counter() - t0
    classes = sorted({r.label for r in real["train"]})
    real_counts = {c: sum(r.label == c for r in real["train"]) for c in classes}
    pools, start = {}, 0
    for name, recs in synthetic.items():
        pools[name] = {c: [start + i for i, r in enumerate(recs) if r.label == c] for c in classes}
        start += len(recs)
    plan = []
    if 0 in cfg.ratios or not synthetic:
        plan += [({"set": None, "arm": REAL_ONLY, "ratio": 0.0, "seed": s}, []) for s in cfg.seeds]
    for name, pool in pools.items():
        for ratio in (r for r in cfg.ratios if r != 0):
            for s in cfg.seeds:
                index, _ = synthetic_subset(real_counts, pool, ratio, s)
                plan.append(({"set": name, "arm": f"ratio {ratio:g}", "ratio": ratio, "seed": s}, index))
    arrays_ref = ray.put(arrays)
    task = ray.remote(_task).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                     max_retries=cfg.max_retries, retry_exceptions=True)
    common = {**cfg.model_dump(include=_SPEC_FIELDS), "threads": max(1, int(cfg.num_cpus))}
    launched = [(key, index, task.remote({**common, **key, "syn_index": index}, arrays_ref))
                for key, index in plan]
    runs = []
    for key, index, ref in launched:
        try:
            res = ray.get(ref)
        except Exception as e:  # retries exhausted (or the worker died): report it, never drop it
            res = {"status": "failed", "attempts": cfg.max_retries + 1,
                   "error": f"{type(e).__name__}: {str(e)[-2000:]}", "n_train_synthetic": len(index)}
        runs.append({**key, **res})
    ok = [r for r in runs if r["status"] == "ok"]
    return {
        "config": cfg.model_dump(mode="json"),
        "model": "monai.networks.nets.UNet (DiceLoss), best epoch by val lesion Dice, scored on test",
        "n_real": {s: len(real[s]) for s in ("train", "val", "test")},
        "sets": list(synthetic),
        "n_synthetic_available": {n: {c: len(v) for c, v in p.items()} for n, p in pools.items()},
        "runs": runs,
        "n_failed": len(runs) - len(ok),
        "summary": summarize_by_arm(runs, SCALARS),
        "timing": {"load_s": round(load_s, 2), "wall_s": round(time.perf_counter() - t0, 2),
                   "sum_run_s": round(sum(r.get("seconds", 0) for r in ok), 2)},
    }


def corpus_pairs(synthetic: str, items: Sequence[ImageItem]) -> list[ImageRecord]:
    """The image + mask records of ``items``, the judged images of ``synthetic`` (a generation sink's
    ``samples/`` or ``text2img/``, local or in an object store): each image's mask is the sink's
    ``masks/<class>/<id>.png``. An InputError naming the field when the sink has no masks (generated
    without generate.controlnet) or an image lacks its mask."""
    from busdiff.evaluate.inputs import InputError
    from busdiff.storage import list_dir

    field = f"evaluate.synthetic={synthetic}"
    sink = str(synthetic).rstrip("/").rsplit("/", 1)[0]
    if list_dir(f"{sink}/masks") is None:
        raise InputError(f"{field}: no masks/ beside it (generated without generate.controlnet?): nothing to "
                         "train a segmentation model on; set evaluate.segmentation.enabled=false")
    listed = {c: set((list_dir(f"{sink}/masks/{c}") or ([], []))[0]) for c in {it.label for it in items}}
    records, missing = [], []
    for it in items:
        name = f"{Path(it.path).stem}.png"
        if name not in listed[it.label]:
            missing.append(f"{it.label}/{name}")
        mask = f"{sink}/masks/{it.label}/{name}"
        records.append(ImageRecord(Path(it.path).stem, it.path, it.label, (mask,), "synthetic",
                                   sha256=it.sha256))
    if missing:
        raise InputError(f"{field}: {len(missing)} image(s) have no mask in {sink}/masks, e.g. {missing[0]}")
    return records

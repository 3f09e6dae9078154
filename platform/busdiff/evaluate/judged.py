"""What one evaluation judges, and with what: the real splits after the leakage guard, one or several
synthetic sets (each guarded by its own corpus provenance), and the feature extractor. ``run_evaluate``
judges one set; ``run_classifier_sets`` (the study's classifier stage) judges several in one batch of Ray
tasks. Both start here, so every set meets the same held-out and val images.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from busdiff.config import BusdiffConfig, FidelityConfig
from busdiff.data.records import ImageRecord
from busdiff.evaluate.compare import device_name
from busdiff.evaluate.corpus import CorpusProvenance, read_corpus_provenance
from busdiff.evaluate.features import FeatureExtractor, ImageItem, with_hashes
from busdiff.evaluate.inception import InceptionWeights, resolve_weights
from busdiff.evaluate.inputs import InputError, item_of, read_synthetic, real_records, select
from busdiff.evaluate.leakage import LeakageResult, adapter_trained_ids, guard_held_out, guard_synthetic


@dataclass
class Judged:
    records: list[ImageRecord]  # every real record of the evaluated classes
    train: list[ImageItem]
    val: list[ImageItem]  # after the leakage guard
    held: list[ImageItem]  # after the leakage guard
    synthetic: dict[str, list[ImageItem]]  # per set, after the leakage guard
    synthetic_refused: dict[str, list[dict[str, Any]]]
    guard: LeakageResult
    provenance: dict[str, CorpusProvenance | None] = field(default_factory=dict)


def judged_inputs(cfg: BusdiffConfig, sets: dict[str, str], adapters: Sequence[str] = ()) -> Judged:
    """Read the synthetic folders ``sets`` ({name: folder}) and the real data, check splits and classes,
    and apply the leakage guard (``adapters`` and each set's own provenance); errors name the field."""
    ev = cfg.evaluate
    classes = list(ev.classes)
    synthetic = {name: with_hashes(read_synthetic(folder, classes)) for name, folder in sets.items()}
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
    # the held-out and val images against what the generators and the classifier train on, and each
    # corpus's images refined from them
    judged_splits = [*ev.held_out_splits, ev.val_split]
    provenance = {name: read_corpus_provenance(folder) for name, folder in sets.items()}
    refused = {}
    for name, folder in sets.items():
        prov = provenance[name]
        synthetic[name], refused[name] = guard_synthetic(
            synthetic[name], prov.sources if prov else {}, records, judged_splits, ev.leakage,
            conditions=prov.conditions if prov else {},
        )
        if not synthetic[name]:
            raise InputError(
                f"leakage guard: every synthetic image of {folder} was refined from, or conditioned on "
                "the mask of, a held-out or val image (generate.source_split); nothing left to evaluate"
            )
    trained = adapter_trained_ids(sorted(set(adapters)))
    for prov in provenance.values():
        trained += prov.adapters() if prov else []
    guard = guard_held_out(
        select(records, judged_splits),
        records,
        train_split=ev.train_split,
        adapters=trained,
        quality=cfg.quality,
        mode=ev.leakage,
    )
    held = [item_of(r) for r in guard.kept if r.split in ev.held_out_splits]
    if not held:
        raise InputError(
            "leakage guard: every held-out image was refused (trained on or duplicated); "
            "nothing left to evaluate against"
        )
    return Judged(
        records=records,
        train=[item_of(r) for r in select(records, [ev.train_split])],
        val=[item_of(r) for r in guard.kept if r.split == ev.val_split],
        held=held,
        synthetic=synthetic,
        synthetic_refused=refused,
        guard=guard,
        provenance=provenance,
    )


def feature_extractor(f: FidelityConfig) -> tuple[FeatureExtractor, InceptionWeights, int]:
    """The evaluation's feature extractor (content-keyed cache), its weights, and its Ray workers (0 when
    Ray is not connected: features are then computed in this process)."""
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
    return ext, weights, workers


def run_classifier_sets(cfg: BusdiffConfig, sets: dict[str, str], adapters: Sequence[str] = ()) -> dict:
    """The classifier experiments of ``cfg.evaluate.classifier`` for several synthetic sets ({name:
    folder}) as one batch of Ray tasks, the real-only runs once and shared (the caller connects to Ray).
    Returns the experiments' result with ``sets`` ({name: the set's headline row}) and ``real`` (the
    real-only row) for a table of configurations."""
    from busdiff.evaluate.classifier import ClassifierInputs, rows_of_set, run_experiments

    j = judged_inputs(cfg, sets, adapters)
    ext, _, _ = feature_extractor(cfg.evaluate.fid)
    inputs = ClassifierInputs(j.train, j.val, j.held, j.synthetic)
    result = run_experiments(inputs, cfg.evaluate.classifier, list(cfg.evaluate.classes), ext)
    real = next((r for r in result["summary"] if r["set"] is None), None)
    headline = {}
    for name in sets:
        own = [r for r in rows_of_set(result, name) if r["set"] == name]
        # the headline arm: ratio 1 (as many synthetic as real images) when run, else the first
        row = next((r for r in own if r["ratio"] == 1), own[0] if own else None)
        headline[name] = None if row is None else {**row, "vs_real": row.get("vs_real_only")}
    return {**result, "sets": headline, "real": real,
            "n_judged": {"train": len(j.train), "val": len(j.val), "test": len(j.held)}}

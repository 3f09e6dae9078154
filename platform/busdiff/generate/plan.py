"""The generation plan: one row per image with a stable id, its class, prompt and seeds, derived from the
config alone, so the same config gives the same rows on every run (and a rerun can skip what exists).

Ids are ``<name>-<class>-<index>`` (``syn-benign-00042``); seeds are ``seed + class_index * SEED_STRIDE +
index`` (text2img) and the same from ``refine_seed`` (img2img; the paper used 4000 + i), so adding images
to one class never moves another class's seeds. With ``generate.source`` the rows are real images of a BUSI
folder to refine (ids ``<name>-<record id>``).

The *recipe* is everything that decides an image's pixels (model, adapter, prompts, sampler, sizes, seed
bases, hand-off) but not counts or resources: a sink holds images of one recipe, so a grown count resumes
and a changed recipe is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from busdiff.config import CLASSES, SEED_STRIDE, BusdiffConfig, ConfigError, GenerateConfig
from busdiff.generate.prompts import DEFAULT_TOKEN, PROMPTS, render_prompt
from busdiff.models.adapters import AdapterError, adapter_class_tokens, read_adapter_json
from busdiff.models.presets import model_id

MODES = ("text2img", "refine")


@dataclass
class Plan:
    rows: list[dict[str, Any]]
    recipe: dict[str, Any]
    recipe_hash: str
    counts: dict[str, int]
    mode: str
    base_model: str
    tokens: dict[str, str]  # class -> the word at {token} in its prompt
    adapter: dict[str, Any] | None = None
    adapter_hash: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]

    def provenance(self) -> dict[str, Any]:
        """What evaluation's leakage guard needs to know of this corpus (plan.json "provenance"): the real
        images the adapter trained on and, when refining, the real image each sample was made from."""
        a, prefix = self.adapter or {}, self.recipe["name"]
        return {
            "adapter": None if not a else {
                "hash": self.adapter_hash,
                "base_model": a.get("base_model"),
                "trained_ids": list(a.get("trained_ids") or []),
            },
            "sources": {
                r["id"]: {"record": r["id"].removeprefix(f"{prefix}-"), "sha256": r["source_sha256"]}
                for r in self.rows
                if r["source"]
            },
            # the real (train) image whose mask conditioned each sample
            "conditions": {r["id"]: r["condition_id"] for r in self.rows if r.get("condition_id")},
        }


def make_id(name: str, label: str, index: int) -> str:
    """``make_id("syn", "benign", 42) == "syn-benign-00042"``."""
    return f"{name}-{label}-{index:05d}"


def seed_for(base: int, label: str, index: int) -> int:
    return base + CLASSES.index(label) * SEED_STRIDE + index


def class_counts(g: GenerateConfig) -> dict[str, int]:
    """Images per class: ``count`` (an int for every class, or a mapping), or ``total`` split by ``ratios``
    (default equal) with largest remainders, in class order."""
    if g.total is None:
        counts = {c: g.count for c in CLASSES} if isinstance(g.count, int) else dict(g.count)
        return {c: counts[c] for c in CLASSES if c in counts}
    ratios = g.ratios or {c: 1.0 for c in CLASSES}
    labels = [c for c in CLASSES if c in ratios]
    norm = sum(ratios[c] for c in labels)
    exact = {c: g.total * ratios[c] / norm for c in labels}
    counts = {c: int(exact[c]) for c in labels}
    by_remainder = sorted(labels, key=lambda c: (-(exact[c] - counts[c]), labels.index(c)))
    for c in by_remainder[: g.total - sum(counts.values())]:
        counts[c] += 1
    empty = [c for c, n in counts.items() if n < 1]
    if empty:
        raise ConfigError(
            f"generate.total={g.total} with generate.ratios={ratios} gives 0 images of {', '.join(empty)}: "
            "raise total or the class's share, or leave the class out of ratios"
        )
    return counts


def adapter_hash(adapter: dict[str, Any] | None) -> str:
    """A short content hash of an adapter (its files' sha256s, from adapter.json), for provenance."""
    if not adapter:
        return ""
    return hashlib.sha256(json.dumps(adapter["files"], sort_keys=True).encode()).hexdigest()[:16]


def _read_adapter(g: GenerateConfig, base_model: str) -> dict[str, Any] | None:
    if g.adapters is None:
        return None
    try:
        meta = read_adapter_json(g.adapters)
    except AdapterError as e:
        raise ConfigError(f"generate.adapters={g.adapters!r}: {e}") from e
    if meta["base_model"] != base_model:
        raise ConfigError(
            f"generate.adapters={g.adapters!r} was trained on base model {meta['base_model']!r}, but the "
            f"configured base model (model.preset / model.base) is {base_model!r}: use adapters trained on "
            f"{base_model!r} or set the model to {meta['base_model']!r}"
        )
    return meta


def _class_tokens(g: GenerateConfig, adapter: dict[str, Any] | None) -> dict[str, str]:
    if g.token:
        return {c: g.token for c in CLASSES}
    try:
        return adapter_class_tokens(adapter, CLASSES, DEFAULT_TOKEN)
    except AdapterError as e:
        raise ConfigError(f"generate.adapters={g.adapters!r}: {e} (generate.token)") from e


def _templates(g: GenerateConfig, tokens: dict[str, str], adapter: dict[str, Any] | None) -> dict[str, str]:
    templates = {**PROMPTS, **(g.prompts or {})}
    if adapter and adapter.get("tokens"):
        # The paper's code once loaded a TI token and never put it in the prompt: refuse that here.
        unused = [c for c in CLASSES if "{token}" not in templates[c]]
        if unused:
            raise ConfigError(
                f"generate.prompts: the template(s) of {', '.join(unused)} have no {{token}}, so the "
                f"adapter's textual-inversion token {tokens[unused[0]]!r} would be loaded and never used"
            )
    return templates


def _source_rows(
    cfg: BusdiffConfig, counts: dict[str, int], templates: dict[str, str], tokens: dict[str, str]
) -> list[dict[str, Any]]:
    from busdiff.data.busi import load_dataset
    from busdiff.data.splits import assign_splits

    g = cfg.generate
    records = load_dataset(g.source, layout=cfg.data.layout, skip_bad=cfg.data.skip_bad).records
    if g.source_split != "all":
        records = [r for r in assign_splits(records, cfg.data.split) if r.split == g.source_split]
        if not records:
            raise ConfigError(f"generate.source_split={g.source_split!r}: no image of {g.source} is in it")
    rows = []
    for label, cap in counts.items():
        mine = sorted((r for r in records if r.label == label), key=lambda r: r.id)[:cap]
        for i, r in enumerate(mine):
            rows.append(
                {
                    "id": f"{g.name}-{r.id}",
                    "label": label,
                    "prompt": render_prompt(label, tokens[label], templates),
                    "negative_prompt": g.negative_prompt,
                    "seed": -1,
                    "refine_seed": seed_for(g.refine_seed, label, i),
                    "source": str(Path(r.image_path).resolve()),
                    # content identity of the source, for evaluation's leakage guard (plan.json "sources")
                    "source_sha256": r.sha256,
                }
            )
    if not rows:
        raise ConfigError(f"generate.source={g.source!r} has no image of the classes {', '.join(counts)}")
    return rows


def _condition_rows(cfg: BusdiffConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Give each text2img row its conditioning mask: the lesion mask of a real image of its class from
    the *train* split of ``controlnet.masks`` (default data.root), taken in id order (row i of a class:
    its (i mod n)-th train image), with a transform drawn from the row's seed. Normal rows get an empty
    mask, or no ControlNet (``controlnet.normal: none``). Returns the recipe's ``controlnet`` entry."""
    from busdiff.data.busi import load_dataset
    from busdiff.data.splits import assign_splits
    from busdiff.generate.masks import draw_transform
    from busdiff.models.presets import controlnet_id

    cn = cfg.generate.controlnet
    root = cn.masks or cfg.data.root
    try:
        records = load_dataset(root, layout=cfg.data.layout, skip_bad=cfg.data.skip_bad).records
    except (OSError, ValueError) as e:
        raise ConfigError(f"generate.controlnet.masks={root!r}: {e}") from e
    # only the train split conditions: a held-out patient's lesion must not shape a synthetic image
    train = [r for r in assign_splits(records, cfg.data.split) if r.split == "train"]
    by_class = {c: sorted((r for r in train if r.label == c and r.mask_paths), key=lambda r: r.id)
                for c in CLASSES if c != "normal"}
    index: dict[str, int] = {}
    for row in rows:
        label = row["label"]
        k = index[label] = index.get(label, -1) + 1
        row["controlled"] = label != "normal" or cn.normal == "empty"
        row["condition_id"], row["mask_source"], row["mask_transform"] = "", "[]", ""
        if label == "normal":
            continue
        mine = by_class[label]
        if not mine:
            raise ConfigError(f"generate.controlnet.masks={root!r}: no {label} image with a mask in the "
                              f"train split (data.split) to condition {label} images on")
        rec = mine[k % len(mine)]
        row["condition_id"] = rec.id
        row["mask_source"] = json.dumps([str(Path(m).resolve()) for m in rec.mask_paths])
        row["mask_transform"] = json.dumps(draw_transform(cn.transform, row["seed"]), sort_keys=True)
    return {
        "model": controlnet_id(cn.model, model_id(cfg.model)),
        "conditioning": cn.conditioning,
        "scale": cn.scale,
        "normal": cn.normal,
        "transform": cn.transform.model_dump(mode="json"),
        "masks": str(Path(root).resolve()),
        "masks_split": {"name": "train", "fractions": cfg.data.split.model_dump(mode="json")},
    }


def build_plan(cfg: BusdiffConfig) -> Plan:
    """The plan of ``cfg.generate``; every config and adapter problem raises :class:`ConfigError` naming the
    field, before any Ray worker starts."""
    g = cfg.generate
    base_model = model_id(cfg.model)
    adapter = _read_adapter(g, base_model)
    tokens = _class_tokens(g, adapter)
    templates = _templates(g, tokens, adapter)
    counts = class_counts(g)
    mode = "refine" if g.source is not None else "text2img"
    if mode == "refine":
        rows = _source_rows(cfg, counts, templates, tokens)
    else:
        rows = [
            {
                "id": make_id(g.name, label, i),
                "label": label,
                "prompt": render_prompt(label, tokens[label], templates),
                "negative_prompt": g.negative_prompt,
                "seed": seed_for(g.seed, label, i),
                "refine_seed": seed_for(g.refine_seed, label, i) if g.refine else -1,
                "source": "",
                "source_sha256": "",
            }
            for label, n in counts.items()
            for i in range(n)
        ]
    controlnet = _condition_rows(cfg, rows) if g.controlnet is not None else None
    recipe = {
        "name": g.name,
        "mode": mode,
        "base_model": base_model,
        "model_seed": cfg.model.seed if cfg.model.preset in ("tiny", "sd15-shape") else None,
        "dtype": cfg.model.dtype,
        "adapter_hash": adapter_hash(adapter),
        "prompts": {c: render_prompt(c, tokens[c], templates) for c in counts},
        "negative_prompt": g.negative_prompt,
        "size": g.size,
        "text2img": None
        if mode == "refine"
        else {
            "scheduler": g.scheduler,
            "steps": g.steps,
            "guidance": g.guidance,
            "seed": g.seed,
        },
        "img2img": None
        if not g.refine
        else {
            "scheduler": g.scheduler,
            "steps": g.refine_steps,
            "guidance": g.refine_guidance,
            "strength": g.strength,
            "seed": g.refine_seed,
            "handoff": g.handoff if mode == "text2img" else "image",
        },
        "source": None if g.source is None else str(Path(g.source).resolve()),
        "source_split": g.source_split,
    }
    if controlnet is not None:  # only then: the recipes (and sinks) of every other plan stay as they were
        recipe["controlnet"] = controlnet
    recipe_hash = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    counts = {c: n for c in counts if (n := sum(r["label"] == c for r in rows))}
    return Plan(
        rows=rows,
        recipe=recipe,
        recipe_hash=recipe_hash,
        counts=counts,
        mode=mode,
        base_model=base_model,
        tokens=tokens,
        adapter=adapter,
        adapter_hash=adapter_hash(adapter),
    )

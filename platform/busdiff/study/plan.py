"""The study's plan: its configurations turned into stage runs, each keyed by its recipe.

A stage run is one call of a stage function (``run_finetune``, ``run_generate``, ``run_evaluate``, the
classifier experiments) with its own resolved config and its own folder ``<study.out>/<kind>/<key>``.
Configurations that need the same recipe share the run: ``lora`` and ``lora_ti`` read two adapters of one
fine-tuning run (the LoRA phase's and the final one), ``lora_ti`` and ``lora_ti_refined`` two folders of one
generation sink. Keys are hashes of what decides a stage's output (its config section and the keys of the
runs it reads), not of resources or output paths, so the whole plan is known, and every override checked,
before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from busdiff.config import (
    BusdiffConfig,
    ConfigError,
    FinetuneConfig,
    GenerateConfig,
    StudyArmConfig,
    _merge,
)
from busdiff.finetune.rundir import LORA_PHASE_ADAPTERS, fingerprint
from busdiff.generate.plan import build_plan
from busdiff.storage import absolute

# Evaluation fields that say where it writes or what it reads (given by the plan), not how it judges.
_NOT_EVALUATION_RECIPE = {"out", "synthetic", "adapters", "classifier", "grid_per_class"}


def recipe_key(*parts: Any) -> str:
    """16 hex digits of the sha256 of ``parts`` as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageRun:
    kind: str  # finetune | generate | evaluate | classifier
    key: str
    out: str
    cfg: BusdiffConfig
    arms: list[str] = field(default_factory=list)  # the configurations it serves
    needs: list[str] = field(default_factory=list)  # "<kind>/<key>" of the runs it reads

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.key}"


@dataclass
class Arm:
    """One configuration and the runs that make and judge its images."""

    name: str
    synthetic: bool
    adapter: str | None = None  # adapter directory, None for the base model
    finetune: str | None = None  # stage ids
    generate: str | None = None
    evaluate: str | None = None
    images: str | None = None  # the folder of synthetic images judged


@dataclass
class StudyPlan:
    out: str
    cfg: BusdiffConfig  # the study's config with its paths made absolute
    runs: dict[str, StageRun]  # by id, in execution order
    arms: list[Arm]
    classifier: StageRun | None


def _override(section: BaseModel, extra: dict[str, Any], cls: type[BaseModel], where: str) -> Any:
    try:
        return cls.model_validate(_merge(section.model_dump(), extra))
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{where}: {bad}") from None


def _adapter_dir(ft_out: str, ft: FinetuneConfig, arm: StudyArmConfig, where: str) -> str:
    if arm.adapter == "final":
        return f"{ft_out}/adapters"
    if ft.method == "lora":
        return f"{ft_out}/adapters"
    if ft.method == "lora-then-ti":
        return f"{ft_out}/{LORA_PHASE_ADAPTERS}"
    raise ConfigError(
        f"{where}.adapter=lora_phase needs finetune.method lora or lora-then-ti, not {ft.method!r}"
    )


def build_study_plan(cfg: BusdiffConfig) -> StudyPlan:
    """Every stage run of ``cfg.study``; bad overrides raise ConfigError naming the configuration."""
    st = cfg.study
    # one absolute place for every stage, whichever node runs it: a URI as given, a local path resolved
    out = absolute(st.out)
    # Ray workers may start elsewhere: every stage reads the miniature base from the driver's cache folder
    mini = cfg.model.miniature
    mini = mini.model_copy(update={"cache_dir": str(Path(mini.cache_dir).expanduser().resolve())})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"miniature": mini})})
    runs: dict[str, StageRun] = {}
    arms: list[Arm] = []
    phantom = cfg.phantom.model_dump() if st.phantom_data else None
    data_key = {"data": cfg.data.model_dump(mode="json"), "phantom": phantom}

    def add(run: StageRun, arm: str) -> StageRun:
        run = runs.setdefault(run.id, run)
        run.arms.append(arm)
        return run

    for i, a in enumerate(st.configurations):
        where = f"study.configurations[{i}] ({a.name})"
        arm = Arm(a.name, a.synthetic)
        arms.append(arm)
        if not a.synthetic:
            continue
        needs: list[str] = []
        adapter = None
        ft_key = None
        if a.adapter != "none":
            ft = _override(cfg.finetune, a.finetune, FinetuneConfig, f"{where}.finetune")
            ft_cfg = cfg.model_copy(update={"finetune": ft})
            ft_key = recipe_key(fingerprint(ft_cfg), phantom)  # what fine-tuning itself resumes under
            ft_out = f"{out}/finetune/{ft_key}"
            adapter = _adapter_dir(ft_out, ft, a, where)
            ft_cfg = cfg.model_copy(update={"finetune": ft.model_copy(update={"out": ft_out})})
            arm.finetune = add(StageRun("finetune", ft_key, ft_out, ft_cfg), a.name).id
            needs.append(arm.finetune)
        g = _override(cfg.generate, a.generate, GenerateConfig, f"{where}.generate")
        if a.images == "text2img" and not (g.keep_text2img and g.refine):
            raise ConfigError(f"{where}.images=text2img needs generate.keep_text2img and generate.refine")
        g = g.model_copy(update={"adapters": None})
        # generation's own recipe (what decides the pixels), the adapter named by the run that makes it
        recipe = build_plan(cfg.model_copy(update={"generate": g})).recipe
        gen_key = recipe_key(recipe, ft_key, adapter and Path(adapter).name, g.keep_text2img)
        gen_out = f"{out}/generate/{gen_key}"
        g = g.model_copy(update={"out": gen_out, "adapters": adapter})
        arm.adapter = adapter
        arm.generate = add(StageRun("generate", gen_key, gen_out, cfg.model_copy(update={"generate": g}),
                                    needs=needs), a.name).id
        arm.images = f"{gen_out}/{a.images}"

    adapters = sorted({a.adapter for a in arms if a.adapter})
    for a, arm in zip(st.configurations, arms, strict=True):
        if not arm.synthetic:
            continue
        ev = cfg.evaluate
        # the segmentation judge needs image + mask pairs: only the arms generated with a ControlNet
        pairs = runs[arm.generate].cfg.generate.controlnet is not None
        ev = ev.model_copy(update={"segmentation": ev.segmentation.model_copy(
            update={"enabled": ev.segmentation.enabled and pairs})})
        judging = ev.model_dump(mode="json", exclude=_NOT_EVALUATION_RECIPE)
        ev_key = recipe_key(data_key, cfg.quality.model_dump(mode="json"), judging, runs[arm.generate].key,
                            a.images, adapters)
        ev_out = f"{out}/evaluate/{ev_key}"
        ev = ev.model_copy(update={
            "out": ev_out, "synthetic": arm.images, "adapters": adapters,
            "classifier": ev.classifier.model_copy(update={"enabled": False}),
        })
        arm.evaluate = add(StageRun("evaluate", ev_key, ev_out, cfg.model_copy(update={"evaluate": ev}),
                                    needs=[arm.generate]), a.name).id

    classifier = None
    if cfg.evaluate.classifier.enabled:
        judged = {arm.name: runs[arm.evaluate].key for arm in arms if arm.synthetic}
        key = recipe_key(judged, cfg.evaluate.classifier.model_dump(mode="json"), data_key, adapters)
        classifier = StageRun("classifier", key, f"{out}/classifier/{key}", cfg,
                              arms=[a.name for a in arms], needs=[runs[arm.evaluate].id for arm in arms
                                                                   if arm.synthetic])
        runs[classifier.id] = classifier
    return StudyPlan(out, cfg, runs, arms, classifier)

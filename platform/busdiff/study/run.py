"""``run_study(cfg)``: every stage run of the study's plan that is not finished yet, then study.json and
report.html. A stage run is finished when its record ``<out>/stages/<kind>-<key>.json`` exists (written only
after the stage returned); a killed driver leaves it unwritten, and the rerun calls the stage again, which
resumes by itself (fine-tuning from its checkpoint, generation from its sink). A finished study reruns
without calling any stage and rewrites nothing.

The caller connects to Ray (``busdiff study``, jobs/study.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from busdiff.config import BusdiffConfig
from busdiff.storage import read_bytes, write_text
from busdiff.study.plan import StageRun, StudyPlan, build_study_plan
from busdiff.study.report import render_report
from busdiff.study.results import join_results


@dataclass
class StudyResult:
    out: str
    study_json: str
    report_html: str
    ran: list[str]  # stage ids run this time
    skipped: list[str]  # stage ids already finished
    study: dict[str, Any]
    seconds: float


def _say(msg: str) -> None:
    print(f"study: {msg}", flush=True)


def _finetune(run: StageRun, plan: StudyPlan) -> dict[str, Any]:
    from busdiff.finetune import run_finetune

    res = run_finetune(run.cfg)
    return {"adapter_dir": res.adapter_dir, "steps": res.steps, "n_images": res.n_images}


def _generate(run: StageRun, plan: StudyPlan) -> dict[str, Any]:
    from busdiff.generate.pipeline import format_summary, run_generate

    res = run_generate(run.cfg)
    print(format_summary(res), flush=True)
    return {"written": res.written, "planned": res.planned, "recipe_hash": res.recipe_hash}


def _evaluate(run: StageRun, plan: StudyPlan) -> dict[str, Any]:
    from busdiff.evaluate.run import run_evaluate, summary_lines

    res = run_evaluate(run.cfg)
    print("\n".join(summary_lines(res.metrics)), flush=True)
    return {"metrics": res.metrics_path}


def _classifier(run: StageRun, plan: StudyPlan) -> dict[str, Any]:
    from busdiff.evaluate.judged import run_classifier_sets

    sets = {arm.name: arm.images for arm in plan.arms if arm.synthetic}
    result = run_classifier_sets(run.cfg, sets, adapters=[a.adapter for a in plan.arms if a.adapter])
    path = f"{run.out}/classifier.json"
    _write_if_changed(path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return {"result": path}


STAGES: dict[str, Callable[[StageRun, StudyPlan], dict[str, Any]]] = {
    "finetune": _finetune,
    "generate": _generate,
    "evaluate": _evaluate,
    "classifier": _classifier,
}


def _write_if_changed(path: str, text: str) -> bool:
    if read_bytes(path) == text.encode():
        return False
    write_text(path, text)
    return True


def record_path(plan: StudyPlan, run: StageRun) -> str:
    """Where the stage run's record goes: a local path or a URI under study.out."""
    return f"{plan.out}/stages/{run.kind}-{run.key}.json"


def write_study_phantoms(cfg: BusdiffConfig) -> None:
    """With ``study.phantom_data``, the phantom data set in data.root (once): before the plan, which reads
    the masks of data.root for a ControlNet configuration."""
    if cfg.study.phantom_data:
        from busdiff.data.phantom import write_phantom_once

        p = cfg.phantom
        if write_phantom_once(cfg.data.root, p.n_per_class, seed=p.seed, size=p.size):
            _say(f"phantom data: {p.n_per_class} per class at {p.size} px -> {cfg.data.root}")


def run_study(cfg: BusdiffConfig) -> StudyResult:
    """Run the study of ``cfg.study``; see the module docstring."""
    t0 = time.perf_counter()
    write_study_phantoms(cfg)
    plan = build_study_plan(cfg)  # every override checked before any stage runs
    runs = list(plan.runs.values())
    todo = [r for r in runs if read_bytes(record_path(plan, r)) is None]
    _say(f"{len(plan.arms)} configurations ({', '.join(a.name for a in plan.arms)}), {len(runs)} stage runs, "
         f"{len(runs) - len(todo)} finished before, {len(todo)} to run; out {plan.out}")
    if todo and cfg.model.preset == "miniature":
        from busdiff.models.presets import resolve_miniature

        # pretrained once here (cached by recipe), not by the first Ray actor while the others wait
        _say(f"base model: miniature -> {resolve_miniature(plan.cfg.model).base}")
    ran = []
    for k, run in enumerate(todo, 1):
        _say(f"[{k}/{len(todo)}] {run.kind} {run.key} for {', '.join(run.arms)} -> {run.out}")
        t = time.perf_counter()
        info = STAGES[run.kind](run, plan)
        record = {"kind": run.kind, "key": run.key, "out": run.out, "arms": run.arms,
                  "seconds": round(time.perf_counter() - t, 1), **info}
        _write_if_changed(record_path(plan, run), json.dumps(record, indent=2, sort_keys=True) + "\n")
        ran.append(run.id)
    study = join_results(plan, cfg)
    study_json, report_html = f"{plan.out}/study.json", f"{plan.out}/report.html"
    _write_if_changed(study_json, json.dumps(study, indent=2, sort_keys=True) + "\n")
    _write_if_changed(report_html, render_report(study, plan))
    skipped = [r.id for r in runs if r.id not in ran]
    return StudyResult(plan.out, study_json, report_html, ran, skipped, study,
                       time.perf_counter() - t0)

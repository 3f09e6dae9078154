"""The same training steps in one process, without Ray: the benchmark's baseline and a debugging aid.
Rows are decoded here instead of by Ray Data; model, micro-batches, noise and updates are the Ray Train
loop's own (FinetuneModel, EpochBatches, Learner), so one worker and this loop train the same weights."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from busdiff.config import BusdiffConfig
from busdiff.data.records import ImageRecord
from busdiff.finetune.data import EpochBatches, collect_rows, decode_row, training_items
from busdiff.finetune.learner import Learner
from busdiff.finetune.model import FinetuneModel
from busdiff.finetune.recipe import phases


def local_rows(cfg: BusdiffConfig, records: list[ImageRecord]) -> list[dict[str, Any]]:
    ft = cfg.finetune
    items = training_items(records)
    return collect_rows(decode_row(it, ft.resolution, ft.crop == "center") for it in items)


@dataclass
class PlainRun:
    model: FinetuneModel
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    samples_per_step: list[int] = field(default_factory=list)


def plain_train(
    cfg: BusdiffConfig,
    rows: list[dict[str, Any]],
    device: torch.device | None = None,
    model: FinetuneModel | None = None,
    start: int = 0,
    stop: int | None = None,
    learner_state: dict | None = None,
    on_step: Callable[[int, Learner], None] | None = None,
) -> PlainRun:
    """Run global steps ``start`` to ``stop`` (default: all) of the run's phases as one worker (rank 0 of
    1). ``model`` and ``learner_state`` continue an earlier call; ``on_step(step, learner)`` runs after
    each step (e.g. to take a checkpoint)."""
    ft = cfg.finetune
    model = model or FinetuneModel(cfg, device or torch.device("cpu"))
    run = PlainRun(model)
    plan = phases(ft)
    stop = sum(p.steps for p in plan) if stop is None else stop
    offset = 0
    for pi, phase in enumerate(plan):
        lo, hi = max(start - offset, 0), min(stop - offset, phase.steps)
        if lo < hi:
            data = EpochBatches(
                rows,
                phase.batch_size,
                len(rows) // phase.batch_size,
                ft.seed,
                0,
                ft.resolution,
                ft.random_flip,
                ft.crop == "random",
            )
            learner = Learner(model, phase, pi, world_size=1)
            if learner_state is not None and lo > 0:
                learner.load_state_dict(learner_state)
            for k in range(lo, hi):
                t = time.perf_counter()
                run.losses.append(learner.step(data, k))
                run.step_seconds.append(time.perf_counter() - t)
                run.samples_per_step.append(phase.samples_per_step(1))
                if on_step is not None:
                    on_step(offset + k + 1, learner)
        offset += phase.steps
    return run

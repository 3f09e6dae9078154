"""``busdiff finetune CONFIG [--set key=value ...]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def _cmd_finetune(a: argparse.Namespace) -> int:
    from busdiff.cliconfig import command_config, connect_for

    cfg = command_config(a.config, a.overrides, "finetune")  # config errors before the heavy imports

    from busdiff.finetune.rundir import finished_run

    done = finished_run(cfg)  # a finished run of this very config: answer from finetune.out, touch nothing
    if done is not None:
        adapters = done["adapter_dir"]
        print(f"{adapters}: already finished ({done['steps']} steps, {done['updated']}); nothing to do")
        out = adapters.rpartition("/")[0]
        _print_summary(out, adapters, done["steps"], done["n_images"], done["seconds"], done["metrics"])
        return 0

    from busdiff.finetune.trainer import FinetuneError, prepare, run_finetune

    prepared = prepare(cfg)  # bad input: an error naming the field, before Ray starts
    connect_for(cfg, "finetune")
    if prepared.resumable:
        print(f"{prepared.out} holds this run: resuming from its latest checkpoint", flush=True)
    try:
        res = run_finetune(cfg, prepared)
    except FinetuneError as e:
        print(f"busdiff finetune: error: {e}", file=sys.stderr)
        return 1
    _print_summary(res.out, res.adapter_dir, res.steps, res.n_images, res.seconds, res.metrics)
    return 0


def _print_summary(out: str, adapters: str, steps: int, n_images: int, seconds: float,
                   metrics: dict[str, Any]) -> None:
    summary = {"out": out, "adapters": adapters, "steps": steps, "n_images": n_images,
               "seconds": round(seconds, 1), "loss": metrics.get("loss")}
    print(json.dumps(summary, indent=2), flush=True)


def add_subcommand(sub: Any, add_config_args: Callable[..., None]) -> None:
    p = sub.add_parser(
        "finetune",
        help="train LoRA / textual-inversion adapters on Ray Train (rerun the same config to resume)",
        description="Fine-tune adapters (finetune.method: lora, ti, lora+ti, lora-then-ti) on the split(s) "
        "finetune.splits of data.root, on Ray Train workers of a local Ray cluster (or the one of "
        "RAY_ADDRESS / `ray job submit`); writes config.yaml, run.json, checkpoints, metrics.jsonl, "
        "validation grids and adapters/ to finetune.out. A rerun resumes from the latest checkpoint; a "
        "finished run answers from finetune.out at once and rewrites nothing; another training config into "
        "the same finetune.out is refused, naming the fields.",
    )
    from busdiff.config import BusdiffConfig

    d = BusdiffConfig()  # the built-in defaults, quoted in the help as they are
    ft = d.finetune
    add_config_args(
        p,
        f"the built-in defaults: the paper's full recipe ({ft.method}: LoRA r{ft.lora.rank} at "
        f"{ft.resolution} px for {ft.lora.steps} steps, then TI for {ft.ti.steps} steps) on "
        f"model.preset={d.model.preset}, data.root={d.data.root}, into {ft.out}",
        "finetune",
    )
    p.set_defaults(func=_cmd_finetune)

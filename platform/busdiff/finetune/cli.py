"""``busdiff finetune CONFIG [--set key=value ...]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def _cmd_finetune(a: argparse.Namespace) -> int:
    from busdiff.config import load_config
    from busdiff.finetune.trainer import FinetuneError, prepare, run_finetune
    from busdiff.raycluster import connect

    cfg = load_config(a.config, a.overrides)
    prepared = prepare(cfg)  # bad input: an error naming the field, before Ray starts
    resources = connect(cfg.ray)
    print(f"connected to Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs", flush=True)
    if prepared.resumable:
        print(f"{prepared.out} holds this run: resuming from its latest checkpoint", flush=True)
    try:
        res = run_finetune(cfg, prepared)
    except FinetuneError as e:
        print(f"busdiff finetune: error: {e}", file=sys.stderr)
        return 1
    summary = {
        "out": res.out,
        "adapters": res.adapter_dir,
        "steps": res.steps,
        "n_images": res.n_images,
        "seconds": round(res.seconds, 1),
        "loss": res.metrics.get("loss"),
    }
    print(json.dumps(summary, indent=2), flush=True)
    return 0


def add_subcommand(sub: Any, add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "finetune",
        help="train LoRA / textual-inversion adapters on Ray Train (rerun the same config to resume)",
        description="Fine-tune adapters (finetune.method: lora, ti, lora+ti, lora-then-ti) on the "
        "training split; writes checkpoints, metrics.jsonl, validation grids and adapters/ to finetune.out.",
    )
    add_config_args(p)
    p.set_defaults(func=_cmd_finetune)

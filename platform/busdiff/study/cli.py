"""``busdiff study CONFIG [--set key=value ...]``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def _cmd_study(a: argparse.Namespace) -> int:
    return run_study_command(a.config, a.overrides)


def run_study_command(config: str | None, overrides: list[str]) -> int:
    """``busdiff study`` (and ``busdiff demo``): check the plan, connect to Ray, run, print where it is."""
    from busdiff.config import load_config
    from busdiff.raycluster import connect
    from busdiff.study.plan import build_study_plan
    from busdiff.study.run import run_study

    cfg = load_config(config, overrides)
    build_study_plan(cfg)  # bad configurations: an error naming the field, before Ray starts
    resources = connect(cfg.ray)
    print(f"connected to Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs", flush=True)
    res = run_study(cfg)
    print(f"study: {len(res.ran)} stage runs done now, {len(res.skipped)} already finished; "
          f"{res.seconds:.1f} s", flush=True)
    print(f"study: {res.study_json}\nstudy: {res.report_html}", flush=True)
    return 0


def add_subcommand(sub: Any, add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "study",
        help="the paper's comparison as one resumable job: fine-tune, generate and judge every configuration",
        description="Runs each stage once per distinct recipe (folders under study.out keyed by it; a rerun "
        "skips what is finished) and writes study.json and report.html to study.out.",
    )
    add_config_args(p)
    p.set_defaults(func=_cmd_study)

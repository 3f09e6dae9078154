"""``busdiff study CONFIG [--set key=value ...]``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def _cmd_study(a: argparse.Namespace) -> int:
    return run_study_command(a.config, a.overrides)


def run_study_command(config: str | None, overrides: list[str]) -> int:
    """``busdiff study`` (and ``busdiff demo``): check the plan, connect to Ray, run, print where it is."""
    from busdiff.cliconfig import command_config, connect_for

    cfg = command_config(config, overrides, "study")  # config errors before the heavy imports

    from busdiff.study.plan import build_study_plan
    from busdiff.study.run import run_study, write_study_phantoms

    write_study_phantoms(cfg)  # (the plan of a ControlNet configuration reads data.root's masks)
    build_study_plan(cfg)  # bad configurations: an error naming the field, before Ray starts
    connect_for(cfg, "study")
    res = run_study(cfg)
    print(f"study: {len(res.ran)} stage runs done now, {len(res.skipped)} already finished; "
          f"{res.seconds:.1f} s", flush=True)
    print(f"study: {res.study_json}\nstudy: {res.report_html}", flush=True)
    return 0


def add_subcommand(sub: Any, add_config_args: Callable[..., None]) -> None:
    p = sub.add_parser(
        "study",
        help="the paper's comparison as one resumable job: fine-tune, generate and judge every configuration",
        description="The paper's comparison of study.configurations (real, base, lora, lora_ti, "
        "lora_ti_refined by default) as one job on Ray: runs each stage once per distinct recipe (folders "
        "under study.out keyed by it; a rerun skips what is finished) and writes study.json and "
        "report.html to study.out. `busdiff demo` is this command on jobs/configs/local.yaml.",
    )
    from busdiff.config import BusdiffConfig

    d = BusdiffConfig()  # the built-in defaults, quoted in the help as they are
    add_config_args(
        p,
        f"the built-in defaults: every configuration at the paper's full recipe on "
        f"model.preset={d.model.preset}, data.root={d.data.root}, into {d.study.out}",
        "study",
    )
    p.set_defaults(func=_cmd_study)

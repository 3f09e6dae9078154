"""The ``busdiff`` command. Every subcommand calls the same library functions as the jobs/ entrypoints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from busdiff.config import ConfigError, DataConfig, QualityConfig, dump_config, load_config
from busdiff.data.records import DatasetError

#: The embedded default's config (the repository's jobs/configs/local.yaml).
LOCAL_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "local.yaml"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (defaults when omitted)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set generate.steps=8 (repeatable)",
    )


def _cmd_data_check(a: argparse.Namespace) -> int:
    from busdiff.data.check import run_data_check
    from busdiff.data.quality import format_report

    data = DataConfig(root=a.dir, layout=a.layout, skip_bad=a.skip_bad)
    quality = QualityConfig(hash_size=a.hash_size, near_duplicate_distance=a.near_distance)
    report = run_data_check(data, quality, json_out=a.json)
    print(format_report(report))
    if a.json:
        print(f"report written to {a.json}")
    return 0


def _cmd_data_phantom(a: argparse.Namespace) -> int:
    from busdiff.data.phantom import write_phantom

    paths = write_phantom(a.out, a.n_per_class, seed=a.seed, size=a.size)
    print(f"wrote {len(paths)} phantom images with masks to {a.out} (Kaggle BUSI layout)")
    return 0


def _cmd_config(a: argparse.Namespace) -> int:
    print(dump_config(load_config(a.config, a.overrides)), end="")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from busdiff.raycluster import connect
    from busdiff.serving.app import check_auth, run_serve

    cfg = load_config(a.config, a.overrides)
    check_auth(cfg.serve)  # an unauthenticated remote host is refused before Ray starts
    connect(cfg.ray)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/"
    print(f"serving on {url} (gallery at /, API docs at /docs)", flush=True)
    run_serve(cfg, blocking=True)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    """``make demo``'s job: the study of the embedded default (jobs/configs/local.yaml) unless a config is
    given."""
    from busdiff.study.cli import run_study_command

    return run_study_command(a.config or str(LOCAL_CONFIG), a.overrides)


def _cmd_generate(a: argparse.Namespace) -> int:
    from busdiff.generate.pipeline import format_summary, run_generate
    from busdiff.generate.plan import build_plan
    from busdiff.raycluster import connect

    cfg = load_config(a.config, a.overrides)
    plan = build_plan(cfg)  # bad config or adapters: an error naming the field, before Ray starts
    resources = connect(cfg.ray)
    print(f"connected to Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs", flush=True)
    print(format_summary(run_generate(cfg, plan)), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="busdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="BUSI data: quality check, phantom generator").add_subparsers(
        dest="data_command", required=True
    )
    check = data.add_parser("check", help="counts, sizes, duplicates, leaks across splits/classes, bad files")
    check.add_argument("dir", help="BUSI folder: Kaggle layout (Dataset_BUSI_with_GT) or manifest layout")
    check.add_argument("--json", metavar="OUT", help="write the full report as JSON (local path or s3://...)")
    check.add_argument("--layout", choices=["auto", "kaggle", "manifest"], default="auto")
    check.add_argument("--skip-bad", action="store_true", help="skip unreadable/unpaired files and list them")
    check.add_argument("--hash-size", type=int, default=QualityConfig().hash_size)
    check.add_argument(
        "--near-distance",
        type=int,
        default=QualityConfig().near_duplicate_distance,
        help="max perceptual-hash Hamming distance for a near duplicate",
    )
    check.set_defaults(func=_cmd_data_check)

    phantom = data.add_parser(
        "phantom", help="write synthetic ultrasound-like images + masks (Kaggle layout)"
    )
    phantom.add_argument("out")
    phantom.add_argument("--n-per-class", type=int, default=8)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--size", type=int, default=256)
    phantom.set_defaults(func=_cmd_data_phantom)

    cfg = sub.add_parser("config", help="print the resolved config (defaults + file + --set)")
    _add_config_args(cfg)
    cfg.set_defaults(func=_cmd_config)

    # ---- finetune subcommand ----
    from busdiff.finetune.cli import add_subcommand as add_finetune_subcommand

    add_finetune_subcommand(sub, _add_config_args)

    # ---- generate subcommand ----
    gen = sub.add_parser(
        "generate",
        help="text2img then img2img refinement on Ray Data into a resumable sink (PNG + parquet metadata)",
    )
    _add_config_args(gen)
    gen.set_defaults(func=_cmd_generate)

    # ---- evaluate subcommands (evaluate, fid) ----
    from busdiff.evaluate.cli import add_subcommands as add_evaluate_subcommands

    add_evaluate_subcommands(sub, _add_config_args)

    # ---- study subcommand ----
    from busdiff.study.cli import add_subcommand as add_study_subcommand

    add_study_subcommand(sub, _add_config_args)

    # ---- serve subcommand ----
    srv = sub.add_parser("serve", help="serve the hybrid pipeline over HTTP on Ray Serve (blocks)")
    _add_config_args(srv)
    srv.set_defaults(func=_cmd_serve)

    demo = sub.add_parser(
        "demo",
        help="`make demo`: the study on the embedded default (jobs/configs/local.yaml), about 10 minutes on "
        "2 CPU cores the first time, seconds once finished",
    )
    _add_config_args(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


def run_job(command: str) -> None:
    """What the jobs/ scripts run: ``python jobs/X.py CONFIG [--set ...]`` is ``busdiff X CONFIG [--set ...]``
    (``--config CONFIG`` accepted too), the same code under ``ray job submit`` and locally."""
    args = sys.argv[1:]
    if args[:1] == ["--config"]:
        args = args[1:]
    sys.exit(main([command, *args]))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, ValueError, FileNotFoundError) as e:
        print(f"busdiff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``busdiff`` command. Every subcommand calls the same library functions as the jobs/ entrypoints."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from busdiff.config import ConfigError, DataConfig, QualityConfig, dump_config, load_config
from busdiff.data.records import DatasetError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (defaults when omitted)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set sample.steps=8 (repeatable)",
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


def _cmd_demo(a: argparse.Namespace) -> int:
    from busdiff.demo import run_demo
    from busdiff.raycluster import connect

    cfg = load_config(a.config, a.overrides)
    connect(cfg.ray)
    res = run_demo(cfg)
    print(
        json.dumps(
            {
                "out": str(res.out),
                "phantom_sheet": str(res.phantom_sheet),
                "sample_grid": str(res.sample_grid),
                "n_samples": res.n_samples,
                "seconds": round(res.seconds, 1),
            },
            indent=2,
        )
    )
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

    # ---- generate subcommand ----

    # ---- evaluate subcommands (evaluate, fid) ----

    demo = sub.add_parser("demo", help="phantom data, data check and a tiny text2img+img2img grid on Ray")
    _add_config_args(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, ValueError, FileNotFoundError) as e:
        print(f"busdiff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

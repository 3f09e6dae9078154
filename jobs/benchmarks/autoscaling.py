"""Autoscaling from zero: a generation job whose actor pools ask for a GPU each, submitted with `ray job
submit` to a head that has no GPU node, on Ray's fake multi-node provider (cluster.yaml's node types, from
tests/e2e/fake-cluster.yaml: the autoscaler starts and stops raylets on this machine, each with a fake
`GPU` resource; the models run on the CPU).

    python jobs/benchmarks/autoscaling.py --json runs/benchmarks/autoscaling.json

Measured from the submission, on this machine's clock:

``scale_up_s``             the first GPU worker node registered (the autoscaler saw the actors' demand,
                           launched a node, its raylet joined)
``time_to_first_image_s``  the first PNG in the sink (driver start, plan, scale-up, actor start, a batch)
``job_s``                  the job finished
``scale_down_s``           from the job's end until every GPU node is gone again (the config's
                           idle_timeout_minutes, 6 s here, plus the autoscaler's rounds)
``resubmit_s``             the same job submitted again: answered from the finished sink (nothing written,
                           no GPU node started)

The cloud adds its instance boot and setup (minutes, README: "A node image") to scale_up_s; what this
measures is Ray's and busdiff's own share. tests/e2e/test_autoscaling.py runs it and checks the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests/e2e/harness.py: the isolated head the e2e tests use

from tests.e2e.harness import RayHead  # noqa: E402

FAKE_CLUSTER = REPO / "tests" / "e2e" / "fake-cluster.yaml"


def gpu_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in nodes if (n.get("resources_total") or {}).get("GPU", 0) > 0]


def _seconds(stamp: str) -> float:
    """The state API's node times: local time as text ("2026-12-03 17:44:27.090000")."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def job_args(out: Path, sets: list[str]) -> list[str]:
    args = ["python", "jobs/generate.py", "jobs/configs/generate-tiny.yaml", "--set", f"generate.out={out}",
            "--set", "generate.text2img.num_gpus=1", "--set", "generate.img2img.num_gpus=1"]
    for s in sets:
        args += ["--set", s]
    return args


def measure(out: Path, sets: list[str], scale_down_timeout: float = 120) -> dict[str, Any]:
    """Start the fake autoscaling cluster, run the job against it, and stop the cluster (its own processes
    only). ``out``: the sink, a new absolute path outside /tmp (the job refuses node-local outputs once
    worker nodes have another IP than the head, as the fake provider's do)."""
    config = yaml.safe_load(FAKE_CLUSTER.read_text())
    with RayHead(num_cpus=0, autoscaling=config) as head, tempfile.TemporaryFile("w+") as log_file:
        before = gpu_nodes(head.nodes())
        t0 = time.time()
        job = subprocess.Popen(  # into a file: an unread pipe would fill and block the job's output
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", ".", "--",
             *job_args(out, sets)],
            cwd=REPO, env={**head.env, "RAY_ADDRESS": head.address}, stdout=log_file,
            stderr=subprocess.STDOUT, text=True,
        )
        first_image = None
        while job.poll() is None:
            if first_image is None and next((out / "samples").rglob("*.png"), None) is not None:
                first_image = time.time()
            time.sleep(0.2)
        job_end = time.time()
        log_file.seek(0)
        log = log_file.read()
        if job.returncode != 0:
            raise RuntimeError(f"the generation job failed ({job.returncode}):\n{log[-4000:]}")
        if first_image is None:  # the whole job ran between two looks
            first_image = min(p.stat().st_mtime for p in (out / "samples").rglob("*.png"))
        started = gpu_nodes(head.nodes())
        deadline = time.monotonic() + scale_down_timeout
        while alive := [n for n in gpu_nodes(head.nodes()) if n["state"] == "ALIVE"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} GPU node(s) alive {scale_down_timeout:g} s after the job")
            time.sleep(2)  # each look is a `ray list nodes` process: a second or two of CPU
        scale_down = time.time() - job_end
        # the same job again: answered from the finished sink, before any actor asks for a GPU
        before_again = _mtimes(out)
        t = time.time()
        again = head.submit(*job_args(out, sets))
        resubmit_s = time.time() - t
        started_again = len(gpu_nodes(head.nodes())) - len(started)
        rewritten = sorted(k for k, v in _mtimes(out).items() if before_again.get(k) != v)
    ups = sorted(_seconds(n["start_time_ms"]) for n in started)
    return {
        "gpu_nodes_before": len(before),
        "gpu_nodes_started": len(started),
        "gpu_nodes_after": len(alive),
        "scale_up_s": round(ups[0] - t0, 2) if ups else None,
        "time_to_first_image_s": round(first_image - t0, 2),
        "job_s": round(job_end - t0, 2),
        "scale_down_s": round(scale_down, 2),
        "idle_timeout_s": config["idle_timeout_minutes"] * 60,
        "resubmit_s": round(resubmit_s, 2),
        "gpu_nodes_started_by_resubmission": started_again,
        "files_rewritten_by_resubmission": rewritten,
        "job_log": log,
        "resubmission_log": again.stdout,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="runs/benchmarks/autoscaling.json")
    p.add_argument("--out", default="runs/autoscaling-corpus", help="the sink (a new folder outside /tmp)")
    p.add_argument("--set", action="append", default=[], help="more settings for the generation job")
    a = p.parse_args()
    out = Path(a.out).resolve()
    if out.exists():
        shutil.rmtree(out)  # a fresh corpus each run: the figures are a first run's
    report = measure(out, a.set)
    report["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    for k in ("job_log", "resubmission_log"):
        report[k] = report[k][-1500:]
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_log")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

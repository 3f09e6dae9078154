"""Autoscaling from zero on Ray's fake multi-node provider (cluster.yaml's node types): a generation job
whose actor pools ask for `num_gpus: 1` is submitted to a head with no GPU node; the autoscaler adds GPU
workers, the job writes exactly its plan with no false alarm in its log, and the workers are removed again
after the idle timeout; the same job submitted again writes nothing and starts no GPU node.
jobs/benchmarks/autoscaling.py does the run (and records its timings); this checks what it did."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from busdiff.config import load_config
from tests.conftest import REPO
from tests.sinkcheck import assert_exactly_the_plan


def _benchmark():
    path = REPO / "jobs" / "benchmarks" / "autoscaling.py"
    spec = importlib.util.spec_from_file_location("autoscaling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_workers_scale_up_from_zero_for_the_job_and_back_down():
    bench = _benchmark()
    # not under /tmp: the job refuses node-local outputs once nodes have other IPs than the head
    (REPO / "runs").mkdir(exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="test-autoscaling-", dir=REPO / "runs")) / "corpus"
    try:
        report = bench.measure(out, [], scale_down_timeout=90)
        assert report["gpu_nodes_before"] == 0
        assert report["gpu_nodes_started"] >= 1  # two pools of one 1-GPU actor each: one or two nodes
        assert report["gpu_nodes_after"] == 0  # scaled back down after the idle timeout
        assert 0 < report["scale_up_s"] < report["time_to_first_image_s"] <= report["job_s"]
        cfg = load_config(REPO / "jobs" / "configs" / "generate-tiny.yaml", [f"generate.out={out}"])
        assert_exactly_the_plan(out, cfg)
        log = report["job_log"]
        assert "12 written, 0 skipped" in log
        # Ray's "... max_restarts > 0" line about Ray Data's actor pools is a false alarm: dropped (issue 10)
        assert "max_restarts > 0" not in log
        # a resubmission is answered from the finished sink: nothing written, no GPU node started
        again = report["resubmission_log"]
        assert "already holds all 12 planned images" in again and "0 written, 12 skipped" in again
        assert report["files_rewritten_by_resubmission"] == []
        assert report["gpu_nodes_started_by_resubmission"] == 0
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)

"""jobs/benchmarks/gpu_suite.sh, the one command for a lent GPU machine, run at toy sizes on the CPU
(GPU_SUITE_DEVICE=cpu) where Ray cannot be imported, as on the GPU machine's image: every benchmark runs
and the one JSON holds each one's result."""

from __future__ import annotations

import json
import os
import subprocess

from tests.e2e.harness import BIN, REPO


def test_the_gpu_suite_runs_every_benchmark_without_ray_and_writes_one_json(tmp_path):
    no_ray = tmp_path / "no-ray"
    (no_ray / "ray").mkdir(parents=True)
    (no_ray / "ray" / "__init__.py").write_text("raise ImportError('ray is not on the GPU image')\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_SUITE_DEVICE": "cpu",
           "PYTHON": str(BIN / "python"), "PYTHONPATH": str(no_ray)}
    r = subprocess.run(["bash", "jobs/benchmarks/gpu_suite.sh"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert doc["device"] == "cpu" and sorted(doc["benchmarks"]) == ["evaluate", "finetune", "generate"]
    bench = doc["benchmarks"]
    tails = {k: b["log_tail"] for k, b in bench.items()}
    assert all(b["exit"] == 0 and b["result"] for b in bench.values()), tails
    rows = bench["finetune"]["result"]["results"]
    assert {(r["gradient_checkpointing"], r["cache_latents"]) for r in rows} == {
        (False, False), (False, True), (True, False), (True, True)}
    assert all(r["plain_samples_per_s"] > 0 for r in rows)
    assert {"paper", "best"} <= set(bench["generate"]["result"]["variants"])
    assert bench["evaluate"]["result"]["features"]["cold_images_per_s"] > 0

"""Classifier runs (one Ray task each) on a node that dies while they train: every run is retried on the
node that joins and reported; none is silently dropped."""

from __future__ import annotations

import contextlib
import threading
import time

import psutil

from busdiff.config import ClassifierConfig
from busdiff.evaluate.classifier import ClassifierInputs, run_experiments
from busdiff.evaluate.inputs import item_of, read_synthetic, real_records, select
from tests.unit.evaluate_fixture import real_phantom, synthetic_folder


def _running_tasks() -> int:
    """Worker processes of this test's cluster (children of this process) running a classifier run."""
    n = 0
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            n += "ray::_task" in " ".join(p.cmdline())
    return n


def test_runs_on_a_lost_node_are_retried_and_all_reported(cluster, add_node, tmp_path):
    recs = real_records(real_phantom(tmp_path / "busi", 8))
    syn = read_synthetic(synthetic_folder(tmp_path / "samples", 3))
    splits = [[item_of(r) for r in select(recs, [s])] for s in ("train", "val", "test")]
    inputs = ClassifierInputs(*splits, syn)
    cfg = ClassifierConfig(
        image_size=32, epochs=1, batch_size=4, ratios=[0, 1], seeds=[0, 1, 2], max_retries=2, device="cpu"
    )
    first = add_node(num_cpus=2)
    result: dict[str, object] = {}
    runner = threading.Thread(
        target=lambda: result.update(out=run_experiments(inputs, cfg, ["benign", "malignant", "normal"])),
        daemon=True,
    )
    runner.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _running_tasks() == 0 and runner.is_alive():
        time.sleep(0.05)
    running = _running_tasks()
    cluster.remove_node(first, allow_graceful=False)
    add_node(num_cpus=2)
    runner.join(timeout=300)
    assert not runner.is_alive(), "the classifier runs did not finish after their node was lost"
    assert running >= 1, "no run was training when the node was lost"
    out = result["out"]
    assert [(r["ratio"], r["seed"]) for r in out["runs"]] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert out["n_failed"] == 0, [r.get("error") for r in out["runs"]]
    assert all(r["status"] == "ok" and 0 <= r["test"]["balanced_accuracy"] <= 1 for r in out["runs"])

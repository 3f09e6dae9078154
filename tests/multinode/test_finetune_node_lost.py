"""Fine-tuning with two data-parallel ranks, one per node: the node holding rank 1 dies mid-run, a new node
joins, and Ray Train's FailureConfig restarts the worker group from the last checkpoint; the final weights
equal those of an uninterrupted run on the same cluster."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from busdiff.config import load_config
from busdiff.data.phantom import write_phantom
from busdiff.finetune.trainer import run_finetune
from tests.ray.test_finetune import STEPS, _sets


def _config(root: Path, out: Path):
    # tests/ray's recipe (30 steps, a checkpoint every 10), with two CPUs a rank on three-CPU nodes: one rank
    # a node, a CPU left on each for the data tasks
    return load_config(None, _sets(root, out, "finetune.validation.every=0", "finetune.max_failures=2",
                                   "finetune.scaling.cpus_per_worker=2"))


def _steps(out: Path) -> list[int]:
    try:
        return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        return []


def _node_of(pid: int, nodes: list) -> object:
    """The cluster node whose raylet started process ``pid`` (a Ray worker is its raylet's child)."""
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in nodes}
    for parent in psutil.Process(pid).parents():
        if parent.pid in raylets:
            return raylets[parent.pid]
    raise AssertionError(f"process {pid} is no worker of this cluster's nodes")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    lora = load_file(str(out / "adapters" / "pytorch_lora_weights.safetensors"))
    return {**lora, "<bus>": load_file(str(out / "adapters" / "learned_embeds.safetensors"))["<bus>"]}


def test_rank_1_node_lost_restarts_from_the_checkpoint_to_the_same_weights(cluster, add_node, tmp_path):
    root = tmp_path / "busi"
    write_phantom(root, 4, seed=7, size=64)
    add_node(num_cpus=3)
    add_node(num_cpus=3)
    reference = run_finetune(_config(root, tmp_path / "reference"))

    out = tmp_path / "lost"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(res=run_finetune(_config(root, out))), daemon=True)
    runner.start()
    # step 20 logged: the report of step 15 returned, so the checkpoint of step 10 is registered
    deadline = time.monotonic() + 240
    while runner.is_alive() and max(_steps(out), default=0) < 20:
        assert time.monotonic() < deadline, "the run did not reach step 20"
        time.sleep(0.05)
    pid = json.loads((out / "workers" / "rank-1.json").read_text())["pid"]
    lost = _node_of(pid, cluster.worker_nodes)
    at = max(_steps(out))
    cluster.remove_node(lost, allow_graceful=False)
    add_node(num_cpus=3)
    runner.join(timeout=300)
    assert not runner.is_alive(), "the run did not finish after rank 1's node was lost"
    assert at < STEPS, "the node was lost only after the run ended"

    ranks = [json.loads((out / "workers" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[1]["pid"] != pid and ranks[0]["resumed_from_step"] in (10, 20)  # a new group resumed
    assert _steps(out) == list(range(5, STEPS + 1, 5))  # steps redone after the restart are logged once
    assert result["res"].steps == reference.steps == STEPS
    ours, theirs = _weights(out), _weights(Path(reference.out))
    assert ours.keys() == theirs.keys()
    # Tolerance: none needed on a CPU (same operations in the same order); 1e-6 allows another BLAS.
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0, msg=k)

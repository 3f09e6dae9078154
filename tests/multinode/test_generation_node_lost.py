"""Generation on three raylets: the node that runs the actor pools dies midway (its raylet, actors and
object store gone), another joins, and the run still ends with exactly the plan."""

from __future__ import annotations

import threading
import time
from collections import Counter

from busdiff.config import load_config
from busdiff.generate.pipeline import run_generate
from busdiff.generate.sink import Sink
from tests.sinkcheck import assert_exactly_the_plan, pngs

SETS = [
    "model.preset=tiny",
    "model.device=cpu",
    "generate.count={benign: 24, malignant: 24, normal: 24}",
    "generate.size=32",
    "generate.steps=6",
    "generate.refine_steps=6",
    "generate.strength=0.5",
    "generate.text2img.batch_size=2",
    "generate.img2img.batch_size=2",
    "generate.writer_num_cpus=0.5",
]


def test_losing_the_actors_node_mid_run_still_gives_exactly_the_plan(cluster, add_node, tmp_path):
    out = tmp_path / "gen"
    cfg = load_config(None, [*SETS, f"generate.out={out}"])
    first = add_node(num_cpus=3)  # both actor pools (1 CPU each) and the writer; the head has 0 CPUs
    # the run in a thread: adding a node must happen in the main thread (Ray sets signal handlers)
    result: dict[str, object] = {}
    runner = threading.Thread(target=lambda: result.update(res=run_generate(cfg)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(pngs(out)) < 6 and runner.is_alive():
        time.sleep(0.05)
    lost_at = len(pngs(out))
    cluster.remove_node(first, allow_graceful=False)  # a node lost, not drained
    add_node(num_cpus=3)
    runner.join(timeout=300)
    assert not runner.is_alive(), "the run did not finish after its node was lost"
    assert 6 <= lost_at < 72, f"{lost_at} PNGs when the node was lost: not midway"
    res = result["res"]
    assert res.written + res.skipped == 72
    assert_exactly_the_plan(out, cfg)
    # the lost node's actor and its replacement on the new node both made images
    workers = Counter(w.rsplit(":", 1)[1] for w in Sink(out).read_metadata()["text2img_worker"].to_pylist())
    assert len(workers) >= 2 and sum(workers.values()) == 72, workers

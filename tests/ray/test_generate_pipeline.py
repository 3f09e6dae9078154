"""Generation on Ray Data (the shared local cluster): resume and idempotence, real-image refinement, and
runs that lose an actor or the driver midway still end with exactly the planned images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from busdiff.config import ConfigError, load_config
from busdiff.generate.pipeline import format_summary, run_generate
from busdiff.generate.sink import SAMPLES, Sink
from busdiff.generate.stages import Img2Img, Text2Img
from tests.conftest import REPO
from tests.sinkcheck import assert_exactly_the_plan, pngs

BASE = {
    "model": {"preset": "tiny", "device": "cpu"},
    "generate": {
        "size": 32,
        "steps": 4,
        "refine_steps": 4,
        "strength": 0.5,
        "writer_num_cpus": 0.5,
        "text2img": {"batch_size": 2},
        "img2img": {"batch_size": 2},
    },
}


def _sets(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _sets(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={v}")
    return out


def _cfg(out: Path, *sets: str):
    return load_config(None, [*_sets(BASE), f"generate.out={out}", *sets])


def _snapshot(out: Path) -> dict[str, int]:
    """Every file with its modification time (summary.json too: a complete rerun leaves it as it is)."""
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_rerun_writes_only_what_is_missing_and_nothing_when_complete(tmp_path):
    out = tmp_path / "gen"
    first = run_generate(_cfg(out, "generate.count=1", "generate.keep_text2img=true"))
    assert (first.written, first.skipped, first.planned) == (3, 0, 3)
    assert set(first.stages) == {"text2img", "img2img", "write"}
    grown = run_generate(_cfg(out, "generate.count=2", "generate.keep_text2img=true"))
    assert (grown.written, grown.skipped, grown.planned) == (3, 3, 6)
    before = _snapshot(out)
    again = run_generate(_cfg(out, "generate.count=2", "generate.keep_text2img=true"))
    assert (again.written, again.skipped) == (0, 6)
    assert _snapshot(out) == before, "a complete rerun rewrote files"
    assert "0 written, 6 skipped" in format_summary(again)
    assert_exactly_the_plan(out, _cfg(out, "generate.count=2"))
    assert len(list((out / "text2img").rglob("*.png"))) == 6

    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(out / SAMPLES))
    assert folder.classes == ["benign", "malignant", "normal"] and len(folder) == 6
    # another recipe into the same sink is refused before any actor starts, naming what changed
    with pytest.raises(ConfigError, match=r"generate.out=.*another recipe.*text2img"):
        run_generate(_cfg(out, "generate.count=2", "generate.steps=5", "generate.keep_text2img=true"))
    assert _snapshot(out) == before


def test_real_images_from_a_folder_are_refined(tmp_path):
    from busdiff.data.phantom import write_phantom

    write_phantom(tmp_path / "busi", 2, seed=3, size=64)
    out = tmp_path / "refined"
    cfg = _cfg(out, f"generate.source={tmp_path / 'busi'}", "generate.name=real", "generate.source_split=all")
    res = run_generate(cfg)
    assert (res.written, res.planned) == (6, 6) and "text2img" not in res.stages
    # plan.json tells evaluation where each image came from (its leakage guard reads it)
    sources = json.loads((out / "plan.json").read_text())["provenance"]["sources"]
    assert sources["real-benign_0001"]["record"] == "benign_0001" and len(sources) == 6
    meta = pq.read_table(out / SAMPLES / "metadata.parquet").to_pylist()
    assert {r["id"] for r in meta} == {
        f"real-{c}_000{i}" for c in ("benign", "malignant", "normal") for i in (1, 2)
    }
    for r in meta:
        assert Path(r["source"]).is_file() and r["seed"] == -1 and r["refine_seed"] >= 4000
        refined = np.asarray(Image.open(out / SAMPLES / r["file_name"])).astype(int)
        real = np.asarray(Image.open(r["source"]).convert("RGB").resize((32, 32), Image.BICUBIC)).astype(int)
        assert refined.shape == real.shape and np.abs(refined - real).mean() > 1  # refined, not copied


def _pids_of(marker: str) -> list[int]:
    """Processes of this test's own Ray cluster (children of this process) whose title holds ``marker``."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def test_killing_a_generation_actor_mid_run_still_gives_exactly_the_plan(tmp_path):
    out = tmp_path / "gen"
    # One image per batch, enough steps that text2img is still busy when the first PNG lands.
    cfg = _cfg(
        out,
        "generate.count={benign: 16}",
        "generate.size=64",
        "generate.steps=25",
        "generate.handoff=latent",
        "generate.text2img.batch_size=1",
        "generate.img2img.batch_size=1",
    )
    killed: dict[str, int] = {}

    def kill_text2img_after_first_png() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            done = pngs(out)
            pids = _pids_of("MapBatches(Text2Img)") if done else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.update(pid=pids[0], done=len(done))
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_text2img_after_first_png, daemon=True)
    watcher.start()
    res = run_generate(cfg)
    watcher.join(timeout=5)
    assert killed, "the Text2Img actor was never seen"
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == "zombie"
    assert res.written == 16 and res.skipped == 0
    assert_exactly_the_plan(out, cfg)
    # the killed actor still had work: its replacement made some of the images
    workers = Counter(w.rsplit(":", 1)[1] for w in Sink(out).read_metadata()["text2img_worker"].to_pylist())
    assert 0 < workers.get(str(killed["pid"]), 0) < 16 and sum(workers.values()) == 16, (killed, workers)


def test_killing_the_driver_then_rerunning_ends_as_an_uninterrupted_run(tmp_path):
    import ray

    out = tmp_path / "gen"
    tree = {
        **BASE,
        "generate": {
            **BASE["generate"],
            "out": str(out),
            "count": {"malignant": 14},
            "size": 64,
            "steps": 10,  # slow enough to be killed after 2 of 14 images (batch 1)
            "text2img": {"batch_size": 1},
            "img2img": {"batch_size": 1},
        },
    }
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(tmp_path / "gen.yaml")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # joins the shared cluster
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "jobs/generate.py", str(tmp_path / "gen.yaml")],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            while len(pngs(out)) < 2 and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert driver.poll() is None, (
                "the driver ended before it could be killed:\n"
                + (tmp_path / "driver.log").read_text()[-3000:]
            )
            driver.send_signal(signal.SIGKILL)
        finally:
            driver.kill()
            driver.wait(timeout=30)
    left = len(pngs(out))
    assert 2 <= left < 14, f"{left} PNGs when the driver was killed"

    res = run_generate(cfg)
    assert res.planned == 14 and res.skipped + res.written == 14 and res.skipped >= 1
    assert_exactly_the_plan(out, cfg)
    assert run_generate(cfg).written == 0

    # the resumed sink holds what an uninterrupted run makes: check ids written before and after the kill
    sink = Sink(out)
    rows = {r["id"]: r for r in sink.read_metadata().to_pylist()}
    g = cfg.generate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t2i = Text2Img(cfg.model.model_dump(), steps=g.steps, guidance=g.guidance, size=g.size)
        i2i = Img2Img(
            cfg.model.model_dump(), steps=g.refine_steps, guidance=g.refine_guidance, strength=g.strength
        )
        for image_id in ("syn-malignant-00000", "syn-malignant-00013"):
            r = rows[image_id]
            batch = {k: np.array([r[k]]) for k in ("id", "prompt", "negative_prompt", "seed", "refine_seed")}
            expected = i2i(t2i(batch))["refined"][0].astype(int)
            got = np.asarray(Image.open(out / SAMPLES / r["file_name"])).astype(int)
            np.testing.assert_allclose(got, expected, atol=2)
    finally:
        torch.set_num_threads(threads)

"""`ray job submit` of jobs/generate.py against a real head: the planned images and metadata appear with
no false alarm from Ray in the log, and a second submission answers from the finished sink, touching
nothing."""

from __future__ import annotations

import pyarrow.parquet as pq

from busdiff.generate.sink import SAMPLES

SETS = [
    "model.preset=tiny",
    "model.device=cpu",
    "generate.count=1",
    "generate.size=32",
    "generate.steps=4",
    "generate.refine_steps=4",
    "generate.strength=0.5",
    # the head has 2 CPUs: both actor pools and the writer tasks fit beside each other
    "generate.text2img.num_cpus=0.5",
    "generate.img2img.num_cpus=0.5",
    "generate.writer_num_cpus=0.5",
]


def _files(out):
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_generate_job_then_resubmission_writes_nothing(ray_head, tmp_path):
    out = tmp_path / "generated"
    args = ["python", "jobs/generate.py", "jobs/configs/generate-tiny.yaml", "--set", f"generate.out={out}"]
    for s in SETS:
        args += ["--set", s]

    first = ray_head.submit(*args)
    assert "connected to Ray: 2 CPUs" in first.stdout
    assert "3 written, 0 skipped" in first.stdout
    # Ray's "... max_restarts > 0" line about Ray Data's actor pools is a false alarm: dropped (issue 10, 9)
    assert "max_restarts > 0" not in first.stdout + first.stderr
    pngs = sorted(p.relative_to(out / SAMPLES).as_posix() for p in (out / SAMPLES).rglob("*.png"))
    assert pngs == [f"{c}/syn-{c}-00000.png" for c in ("benign", "malignant", "normal")]
    meta = pq.read_table(out / SAMPLES / "metadata.parquet")
    assert sorted(meta["file_name"].to_pylist()) == pngs
    assert set(meta["base_model"].to_pylist()) == {"tiny"} and (out / "plan.json").is_file()
    before = _files(out)

    second = ray_head.submit(*args)
    assert "already holds all 3 planned images" in second.stdout and "0 written, 3 skipped" in second.stdout
    assert _files(out) == before  # summary.json included: a finished sink is left as it is

"""`ray job submit` of jobs/generate.py against a real head: the planned images and metadata appear, and a
second submission writes nothing new."""

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
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "summary.json"}


def test_generate_job_then_resubmission_writes_nothing(ray_head, tmp_path):
    out = tmp_path / "generated"
    args = ["python", "jobs/generate.py", "jobs/configs/generate-tiny.yaml", "--set", f"generate.out={out}"]
    for s in SETS:
        args += ["--set", s]

    first = ray_head.submit(*args)
    assert "connected to Ray: 2 CPUs" in first.stdout
    assert "3 written, 0 skipped" in first.stdout
    pngs = sorted(p.relative_to(out / SAMPLES).as_posix() for p in (out / SAMPLES).rglob("*.png"))
    assert pngs == [f"{c}/syn-{c}-00000.png" for c in ("benign", "malignant", "normal")]
    meta = pq.read_table(out / SAMPLES / "metadata.parquet")
    assert sorted(meta["file_name"].to_pylist()) == pngs
    assert set(meta["base_model"].to_pylist()) == {"tiny"} and (out / "plan.json").is_file()
    before = _files(out)

    second = ray_head.submit(*args)
    assert "0 written, 3 skipped" in second.stdout
    assert _files(out) == before

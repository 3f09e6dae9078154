"""`ray job submit` of jobs/study.py against a real head: study.json and report.html appear, and a second
submission runs no stage and rewrites nothing."""

from __future__ import annotations

import json

SETS = [
    # the head has 2 CPUs: the actor pools, writer and classifier tasks fit beside each other
    "generate.text2img.num_cpus=0.5",
    "generate.img2img.num_cpus=0.5",
    "generate.writer_num_cpus=0.5",
    "evaluate.classifier.num_cpus=0.5",
]


def _files(out):
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_study_job_then_resubmission_rewrites_nothing(ray_head, tmp_path):
    out = tmp_path / "study"
    args = ["python", "jobs/study.py", "jobs/configs/study-tiny.yaml", "--set", f"study.out={out}",
            "--set", f"data.root={out}/phantom", "--set", f"evaluate.fid.cache_dir={out}/cache"]
    for s in SETS:
        args += ["--set", s]

    first = ray_head.submit(*args)
    assert "connected to Ray: 2 CPUs" in first.stdout
    doc = json.loads((out / "study.json").read_text())
    names = [r["name"] for r in doc["configurations"]]
    assert names == ["real", "base", "lora", "lora_ti", "lora_ti_refined"]
    assert (out / "report.html").is_file()
    before = _files(out)

    second = ray_head.submit(*args)
    assert "0 stage runs done now" in second.stdout, second.stdout[-2000:]
    assert _files(out) == before

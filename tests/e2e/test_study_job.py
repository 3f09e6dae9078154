"""`ray job submit` of jobs/study.py against a real head: a driver killed (SIGKILL) after its first stage
resumes on resubmission, study.json and report.html appear, and a further submission runs no stage and
rewrites nothing."""

from __future__ import annotations

import json
import signal
import time

import psutil
import yaml

from tests.conftest import REPO

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
    # two configurations keep it short (tests/ray/test_study.py runs all five); no Ray Train start here
    tree = yaml.safe_load((REPO / "jobs" / "configs" / "study-tiny.yaml").read_text())
    tree["study"]["configurations"] = [
        {"name": "real", "synthetic": False, "adapter": "none"},
        {"name": "base", "adapter": "none"},
    ]
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(tree))
    args = ["python", "jobs/study.py", str(config), "--set", f"study.out={out}",
            "--set", f"data.root={out}/phantom", "--set", f"evaluate.fid.cache_dir={out}/cache"]
    for s in SETS:
        args += ["--set", s]

    # the first driver is killed once its first stage run is recorded
    ray_head.ray("job", "submit", "--no-wait", "--working-dir", ".", "--", *args)
    deadline = time.monotonic() + 300
    while not list((out / "stages").glob("*.json")):
        assert time.monotonic() < deadline, "no stage finished in 300 s"
        time.sleep(0.5)
    cmdlines = {p: " ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"])}
    drivers = [p for p, cmd in cmdlines.items() if "jobs/study.py" in cmd and str(out) in cmd]
    assert drivers, "the study's driver process was not found"
    for p in drivers:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(drivers, timeout=30)
    done_before = len(list((out / "stages").glob("*.json")))
    assert not (out / "study.json").exists()

    first = ray_head.submit(*args)
    assert "connected to Ray: 2 CPUs" in first.stdout
    assert f"{done_before} already finished" in first.stdout, first.stdout[-2000:]
    doc = json.loads((out / "study.json").read_text())
    assert [r["name"] for r in doc["configurations"]] == ["real", "base"]
    assert doc["configurations"][1]["fid"]["all"] > 0 and doc["configurations"][0]["classifier"]
    assert (out / "report.html").is_file()
    before = _files(out)

    second = ray_head.submit(*args)
    assert "0 stage runs done now" in second.stdout, second.stdout[-2000:]
    assert _files(out) == before

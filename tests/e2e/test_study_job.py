"""`ray job submit` of jobs/study.py (jobs/configs/study-tiny.yaml: all five configurations) against a real
head: a driver killed (SIGKILL) after its first stage resumes on resubmission; study.json and a report a
person can read appear; a further submission runs no stage and rewrites nothing; a changed setting reruns
only the stages that depend on it."""

from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from busdiff.models.adapters import read_adapter_json
from tests.browser import render

SETS = [
    # the head has 2 CPUs: the actor pools, writer and classifier tasks fit beside each other
    "generate.text2img.num_cpus=0.5",
    "generate.img2img.num_cpus=0.5",
    "generate.writer_num_cpus=0.5",
    "evaluate.classifier.num_cpus=0.5",
]
CONFIGURATIONS = ["real", "base", "lora", "lora_ti", "lora_ti_refined"]


def _files(out):
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def _ran(stdout: str) -> list[str]:
    """The kinds of the stage runs a driver ran, from its "study: [k/n] KIND KEY ..." lines."""
    return sorted(re.findall(r"^study: \[\d+/\d+\] (\w+) ", stdout, flags=re.M))


@pytest.fixture(scope="module")
def study(ray_head, tmp_path_factory):
    """The study submitted, its first driver killed after one stage, resubmitted to the end."""
    out = tmp_path_factory.mktemp("study") / "out"
    args = ["python", "jobs/study.py", "jobs/configs/study-tiny.yaml", "--set", f"study.out={out}",
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

    resumed = ray_head.submit(*args)
    assert "connected to Ray: 2 CPUs" in resumed.stdout
    assert f"{done_before} already finished" in resumed.stdout, resumed.stdout[-2000:]
    return out, args


def test_every_configuration_is_judged_in_study_json_and_the_report(study):
    out, _ = study
    doc = json.loads((out / "study.json").read_text())
    rows = {r["name"]: r for r in doc["configurations"]}
    assert list(rows) == CONFIGURATIONS
    for name in CONFIGURATIONS[1:]:
        assert set(rows[name]["fid"]) == {"benign", "malignant", "normal", "all"}, name
        assert rows[name]["fid"]["all"] > 0 and rows[name]["floor"]["all"] > 0
        assert rows[name]["n_synthetic"]["all"] == 12
    # one sink: lora_ti judges its text2img images, lora_ti_refined their refinements
    assert rows["lora_ti"]["images"].endswith("text2img")
    assert rows["lora_ti_refined"]["images"].endswith("samples")
    assert rows["lora_ti"]["fid"] != rows["lora_ti_refined"]["fid"]
    assert rows["real"]["synthetic"] is False and "fid" not in rows["real"] and rows["real"]["classifier"]
    html = (out / "report.html").read_text()
    assert all(f"<td class=l>{n}</td>" in html for n in CONFIGURATIONS[1:])
    assert "Published figures" in html and "45.97" in html
    assert len(list((out / "stages").glob("finetune-*.json"))) == 1  # lora and lora_ti share one run


def test_lora_reads_the_lora_phase_of_the_one_fine_tuning_run(study):
    out, _ = study
    (ft,) = list((out / "finetune").iterdir())
    lora, final = read_adapter_json(ft / "adapters-lora"), read_adapter_json(ft / "adapters")
    assert lora["tokens"] == [] and final["tokens"] == ["<bus>"] and lora["extra"]["steps"] == 10
    a = load_file(str(ft / "adapters-lora" / lora["lora"]["file"]))
    b = load_file(str(ft / "adapters" / final["lora"]["file"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # LoRA frozen while TI trains


def test_the_report_is_a_page_a_person_can_read(study, tmp_path):
    out, _ = study
    shot = tmp_path / "report.png"
    _, errors = render((out / "report.html").as_uri(), screenshot=shot, size=(1200, 2400))
    assert errors == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.05  # tables and sample grids, not a blank page


def test_resubmission_runs_no_stage_and_rewrites_nothing_then_a_change_reruns_what_depends_on_it(
    study, ray_head
):
    out, args = study
    before = _files(out)
    again = ray_head.submit(*args)
    assert "0 stage runs done now" in again.stdout, again.stdout[-2000:]
    assert _files(out) == before

    changed = ray_head.submit(*args, "--set", "generate.strength=0.7")
    # strength is img2img only: the refined sink and its two evaluations rerun, then the classifier sets
    assert _ran(changed.stdout) == ["classifier", "evaluate", "evaluate", "generate"], changed.stdout[-3000:]

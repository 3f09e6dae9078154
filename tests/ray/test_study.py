"""The study on the shared local cluster with its outputs in a bucket of the S3 API server (tests/s3.py),
as on a cloud cluster: the tiny configurations end to end, a rerun that calls no stage and rewrites no
object, and a changed configuration that reruns only what depends on it. (tests/e2e/test_study_job.py
submits it with local outputs.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from busdiff.config import load_config
from busdiff.models.adapters import local_adapter_dir, read_adapter_json
from busdiff.storage import read_bytes
from busdiff.study.run import run_study
from tests.browser import render
from tests.conftest import REPO
from tests.s3 import BUCKET

TINY = REPO / "jobs" / "configs" / "study-tiny.yaml"
OUT = f"s3://{BUCKET}/study"


@pytest.fixture(scope="module")
def study(s3_for_ray, tmp_path_factory):
    local = tmp_path_factory.mktemp("study")
    sets = [f"study.out={OUT}", f"data.root={local}/phantom", f"evaluate.fid.cache_dir={local}/cache"]
    return s3_for_ray, sets, run_study(load_config(TINY, sets))


def _text(name: str) -> str:
    data = read_bytes(f"{OUT}/{name}")
    assert data is not None, f"{OUT}/{name} was not written"
    return data.decode()


def test_every_configuration_is_judged_in_study_json_and_the_report(study):
    s3, _, res = study
    assert res.study_json == f"{OUT}/study.json"
    doc = json.loads(_text("study.json"))
    rows = {r["name"]: r for r in doc["configurations"]}
    synthetic = ["base", "lora", "lora_ti", "lora_ti_refined",
                 "lora_ti_controlnet", "lora_ti_controlnet_refined"]
    assert list(rows) == ["real", *synthetic]
    for name in synthetic:
        assert set(rows[name]["fid"]) == {"benign", "malignant", "normal", "all"}, name
        assert rows[name]["fid"]["all"] > 0 and rows[name]["floor"]["all"] > 0
        assert rows[name]["n_synthetic"]["all"] == 12
    # one sink: lora_ti judges its text2img images, lora_ti_refined their refinements
    assert rows["lora_ti"]["images"].endswith("text2img")
    assert rows["lora_ti_refined"]["images"].endswith("samples")
    assert rows["lora_ti"]["fid"] != rows["lora_ti_refined"]["fid"]
    assert rows["real"]["synthetic"] is False and "fid" not in rows["real"]
    # the ControlNet pair: one more sink (with masks/), judged by the segmentation model too
    assert rows["lora_ti_controlnet"]["images"].endswith("text2img")
    cn = rows["lora_ti_controlnet_refined"]["images"].removesuffix("/samples")
    assert cn != rows["lora_ti_refined"]["images"].removesuffix("/samples")
    assert all(rows[n]["segmentation"] is None for n in synthetic[:4])
    for name in synthetic[4:]:
        seg = {r["arm"]: r for r in rows[name]["segmentation"]["rows"]}
        assert set(seg) == {"real-only", "ratio 1"} and seg["ratio 1"]["dice_lesion"]["mean"] is not None
    html = _text("report.html")
    assert all(f"<td class=l>{n}</td>" in html for n in synthetic)
    assert "Published figures" in html and "45.97" in html and "Segmentation judge" in html
    assert html.count("<img") == 6  # a sample grid per synthetic configuration, its images read from S3
    assert sorted(k.split("/")[0] for k in res.ran).count("finetune") == 1


def test_lora_reads_the_lora_phase_of_the_one_fine_tuning_run(study):
    s3, _, _ = study
    (ft,) = {k.split("/")[2] for k in s3.objects("study/finetune/")}
    ft = f"{OUT}/finetune/{ft}"
    lora, final = read_adapter_json(f"{ft}/adapters-lora"), read_adapter_json(f"{ft}/adapters")  # from S3
    assert lora["tokens"] == [] and final["tokens"] == ["<bus>"] and lora["extra"]["steps"] == 10
    a = load_file(str(local_adapter_dir(f"{ft}/adapters-lora") / lora["lora"]["file"]))
    b = load_file(str(local_adapter_dir(f"{ft}/adapters") / final["lora"]["file"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # LoRA frozen while TI trains


def test_the_report_is_a_page_a_person_can_read(study, tmp_path):
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(_text("report.html"))  # self-contained: its images are embedded
    _, errors = render(page.as_uri(), screenshot=shot, size=(1200, 2400))
    assert errors == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.05  # tables and sample grids, not a blank page


def test_a_finished_study_reruns_without_any_stage_and_rewrites_nothing(study):
    s3, sets, _ = study
    before = s3.objects("study/")
    res = run_study(load_config(TINY, sets))
    assert res.ran == [] and len(res.skipped) >= 8
    assert res.seconds < 30
    assert s3.objects("study/") == before  # no object rewritten (same ETag and Last-Modified)


def test_a_changed_configuration_reruns_only_what_depends_on_it(study):
    _, sets, _ = study
    res = run_study(load_config(TINY, [*sets, "generate.strength=0.7"]))
    kinds = sorted(k.split("/")[0] for k in res.ran)
    # strength is img2img only: the two refined sinks and their four evaluations rerun, nothing else
    assert kinds == ["classifier", *["evaluate"] * 4, "generate", "generate"], res.ran
    assert not any(k.startswith("finetune/") for k in res.ran)

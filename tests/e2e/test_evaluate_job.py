"""The evaluation job as users run it: `ray job submit --working-dir . -- python jobs/evaluate.py ...`
against a real head on this machine."""

from __future__ import annotations

import json

from tests.unit.evaluate_fixture import real_phantom, shared_cache_dir, synthetic_folder

TINY = [
    "evaluate.fid.bootstrap=20",
    "evaluate.fid.floor_draws=2",
    "evaluate.fid.kid_subsets=10",
    "evaluate.fid.device=cpu",
    "evaluate.classifier.image_size=32",
    "evaluate.classifier.epochs=1",
    "evaluate.classifier.ratios=[0, 1]",
    "evaluate.classifier.seeds=[0]",
    "evaluate.classifier.device=cpu",
    "evaluate.memorization.ssim_size=32",
]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_evaluate_job_writes_metrics_and_report(ray_head, tmp_path):
    real = real_phantom(tmp_path / "busi", 14)
    syn = synthetic_folder(tmp_path / "samples", 3)
    out = tmp_path / "eval"
    r = ray_head.submit(
        "python",
        "jobs/evaluate.py",
        "jobs/configs/evaluate-tiny.yaml",
        *_sets(
            *TINY,
            f"data.root={real}",
            f"evaluate.synthetic={syn}",
            f"evaluate.out={out}",
            f"evaluate.fid.cache_dir={shared_cache_dir()}",
        ),
    )
    assert "connected to Ray: 2 CPUs" in r.stdout
    assert "succeeded" in (r.stdout + r.stderr).lower()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["class"] for row in metrics["fidelity"]["rows"]] == ["benign", "malignant", "normal", "all"]
    assert metrics["fidelity"]["rows"][-1]["floor"]["n_pool_used"] == 9
    assert [run["status"] for run in metrics["classifier"]["runs"]] == ["ok", "ok"]
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html
    assert "metrics:" in r.stdout and "paper protocol" in r.stdout


def test_evaluate_job_bad_input_fails_with_the_folder_named(ray_head, tmp_path):
    real = real_phantom(tmp_path / "busi", 2)
    (tmp_path / "empty").mkdir()
    r = ray_head.submit(
        "python",
        "jobs/evaluate.py",
        *_sets(f"data.root={real}", f"evaluate.synthetic={tmp_path / 'empty'}", f"evaluate.out={tmp_path}/e",
               f"evaluate.fid.cache_dir={tmp_path}/cache"),  # a job's outputs: absolute (jobpaths)
        check=False,
    )
    assert r.returncode != 0
    assert f"synthetic folder {tmp_path / 'empty'} holds no images" in r.stdout + r.stderr

"""A bare `busdiff generate|finetune|evaluate|study|serve` names the shipped configs instead of starting the
paper's full recipe, and SD-size work on CPUs is warned about with an estimate before it starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from busdiff.config import load_config
from busdiff.estimate import CPU_SECONDS_PER_PASS, cpu_estimate

BUSDIFF = Path(sys.executable).parent / "busdiff"
REPO = Path(__file__).resolve().parents[2]


def _busdiff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUSDIFF), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command, shipped", [("generate", "generate-tiny.yaml"),
                                              ("finetune", "finetune-tiny.yaml"),
                                              ("evaluate", "evaluate-tiny.yaml"),
                                              ("study", "study-tiny.yaml"),
                                              ("serve", "serve-local.yaml")])
def test_a_bare_command_lists_the_shipped_configs_and_starts_nothing(command, shipped):
    r = _busdiff(command)
    assert r.returncode == 2, r.stderr
    assert "no config given" in r.stderr and "the paper's full recipe" in r.stderr
    assert f"jobs/configs/{shipped}" in r.stderr and "busdiff demo" in r.stderr
    assert "Traceback" not in r.stderr and "connected to Ray" not in r.stdout


def test_long_work_on_cpus_is_estimated_per_command():
    paper = load_config(None, ["data.root=/d"])  # the defaults: the paper's recipe, CPU actors and workers
    gen = cpu_estimate(paper, "generate")
    # 900 images x (50 guided steps + 15 guided refine steps) passes at batch 2, tiny model
    assert gen is not None and f"about {900 * 65:,} UNet passes" in gen
    assert f"{900 * 65 * CPU_SECONDS_PER_PASS['tiny'] / 3600:,.0f} hours" in gen
    ft = cpu_estimate(paper, "finetune")
    assert ft is not None and f"about {3000 * 4 + 2000 * 4:,} UNet passes" in ft
    sd = cpu_estimate(load_config(None, ["model.preset=sd15-shape"]), "generate")
    assert sd is not None and f"{900 * 65 * CPU_SECONDS_PER_PASS['sd15'] / 3600:,.0f} hours" in sd
    on_gpus = load_config(None, ["generate.text2img.num_gpus=1", "finetune.scaling.use_gpu=true"])
    assert cpu_estimate(on_gpus, "generate") is None and cpu_estimate(on_gpus, "finetune") is None
    demo = load_config(REPO / "jobs" / "configs" / "local.yaml")
    assert cpu_estimate(demo, "study") is None  # minutes, not hours


def test_the_warning_comes_before_any_work(tmp_path):
    """The defaults with one change: the estimate is printed first; here the run then stops at a refused
    adapter folder, before Ray starts."""
    r = _busdiff("generate", "--set", f"generate.adapters={tmp_path}/none", "--set",
                 f"generate.out={tmp_path}/g")
    assert r.returncode == 2
    warn = r.stderr.index("warning: this recipe cannot finish soon on CPUs")
    err = r.stderr.index("error")
    assert warn < err and "hours" in r.stderr and "connected to Ray" not in r.stdout

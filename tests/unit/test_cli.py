from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from busdiff.cli import main

BUSDIFF = str(Path(sys.executable).parent / "busdiff")


@pytest.mark.parametrize(
    "args", [[], ["data"], ["data", "check"], ["data", "phantom"], ["demo"], ["study"], ["config"]]
)
def test_every_subcommand_has_help(args):
    r = subprocess.run([BUSDIFF, *args, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: busdiff" in r.stdout


def test_phantom_then_check_writes_json(tmp_path, capsys):
    root = tmp_path / "busi"
    assert main(["data", "phantom", str(root), "--n-per-class", "2", "--size", "64"]) == 0
    # Plant a leak: the same picture in two classes.
    shutil.copy(root / "benign" / "benign (1).png", root / "malignant" / "malignant (3).png")
    shutil.copy(root / "malignant" / "malignant (1)_mask.png", root / "malignant" / "malignant (3)_mask.png")
    out = tmp_path / "report.json"
    assert main(["data", "check", str(root), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    # Kaggle layout: no split in the data, so the check shows the one the other stages assign
    assert report["split"]["source"] == "assigned" and "none" not in report["counts"]["benign"]
    assert sum(report["counts"]["benign"].values()) == 2 and sum(report["counts"]["malignant"].values()) == 3
    assert ["benign_0001", "malignant_0003"] in report["exact_duplicates"]
    assert any(
        {lk["a"], lk["b"]} == {"benign_0001", "malignant_0003"} and "class" in lk["cross"]
        for lk in report["leaks"]
    )
    printed = capsys.readouterr().out
    assert "benign_0001" in printed and "malignant_0003" in printed


def test_errors_name_the_problem_and_exit_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    (tmp_path / "cfg.yaml").write_text("generate:\n  strength: 2\n")
    assert main(["config", str(tmp_path / "cfg.yaml")]) == 2
    assert "generate.strength" in capsys.readouterr().err


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--set", "generate.steps=11"]) == 0
    assert "steps: 11" in capsys.readouterr().out

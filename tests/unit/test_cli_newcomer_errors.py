"""Issue 10, items 5-7, through the real ``busdiff`` command (a subprocess, real files in tmp_path).

Every refusal here comes before torch or Ray is imported: each run is ``python -X importtime busdiff ...``
and the test reads the modules it imported. None can start a Ray cluster: ``ray`` is shadowed in these
subprocesses by a package whose import fails.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, default_sigint

BUSDIFF = str(Path(sys.executable).parent / "busdiff")
HEAVY = {"torch", "ray"}


@functools.cache
def _ray_shadow() -> Path:
    """A folder whose ``ray`` package fails to import."""
    shadow = Path(tempfile.mkdtemp(prefix="busdiff-no-ray-"))
    atexit.register(shutil.rmtree, shadow, True)
    (shadow / "ray").mkdir()
    (shadow / "ray" / "__init__.py").write_text('raise ImportError("ray imported before the refusal")\n')
    return shadow


def no_ray_env() -> dict[str, str]:
    """The subprocesses' environment (this process's, as it is now): ``import ray`` fails there, so no
    refusal can start a cluster."""
    path = os.pathsep.join(filter(None, [str(_ray_shadow()), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


@dataclass
class Run:
    rc: int
    out: str
    err: str  # stderr without the import-time lines
    imported: set[str]  # top-level packages imported


def busdiff(*args: str, cwd: Path = REPO, script: str = BUSDIFF) -> Run:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", script, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=no_ray_env(),
        timeout=120,
    )
    lines = r.stderr.splitlines()
    imported = {ln.rsplit("|", 1)[-1].strip().split(".")[0] for ln in lines if ln.startswith("import time:")}
    err = "\n".join(ln for ln in lines if not ln.startswith("import time:"))
    return Run(r.returncode, r.stdout, err, imported)


def refused(r: Run, *needles: str) -> str:
    """A one-line refusal, exit 2, no traceback, before torch and Ray; returns the message."""
    assert r.rc == 2, (r.rc, r.err)
    assert "Traceback" not in r.err, r.err
    assert not HEAVY & r.imported, f"imported {HEAVY & r.imported} before refusing: {r.err}"
    for n in needles:
        assert n in r.err, (n, r.err)
    return r.err


def png(path: Path, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (40, 40, 40)).save(path)
    return path


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ---- item 5: `busdiff data phantom` into a folder that holds data ----


def test_phantom_refuses_a_folder_that_holds_data_unless_overwrite(tmp_path):
    out = tmp_path / "phantom"
    assert busdiff("data", "phantom", str(out), "--n-per-class", "1", "--size", "64").rc == 0
    before = files(out)
    assert len(before) == 6

    msg = refused(busdiff("data", "phantom", str(out), "--n-per-class", "2", "--size", "96"), str(out))
    assert "not empty" in msg and "--overwrite" in msg and msg.count("\n") == 0
    assert files(out) == before  # nothing merged

    r = busdiff("data", "phantom", str(out), "--n-per-class", "2", "--size", "96", "--overwrite")
    assert r.rc == 0, r.err
    assert "wrote 6 phantom images" in r.out
    assert len(files(out)) == 12  # the old data replaced, not merged into
    assert {Image.open(out / f).size for f in files(out)} == {(96, 96)}
    assert [p.name for p in tmp_path.iterdir()] == ["phantom"]  # no temporary folder left


def test_phantom_overwrite_never_deletes_other_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = busdiff("data", "phantom", str(tmp_path / "mine"), "--size", "64", "--overwrite")
    msg = refused(r, "notes.txt")
    assert "not phantom data" in msg
    assert files(tmp_path / "mine") == ["notes.txt"]


def test_readme_sections_write_phantoms_into_distinct_folders():
    readme = (REPO / "README.md").read_text()
    folders = re.findall(r"^busdiff data phantom (\S+)", readme, flags=re.M)
    assert len(folders) >= 2 and len(set(folders)) == len(folders), folders


def test_ctrl_c_stops_cleanly_and_leaves_no_half_written_folder(tmp_path):
    out = tmp_path / "phantom"
    p = subprocess.Popen(
        [BUSDIFF, "data", "phantom", str(out), "--n-per-class", "300", "--size", "128"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    deadline = time.monotonic() + 60
    while not any(f.suffix == ".png" for f in tmp_path.rglob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the first image is written, into a folder beside out
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip() == "busdiff: interrupted"
    assert list(tmp_path.iterdir()) == []  # neither out nor a temporary folder


# ---- item 6: bad inputs of `busdiff evaluate`, and no traceback for any input problem ----


@pytest.mark.parametrize(
    "corrupt",
    [b"", b"not a png at all", "truncated"],
    ids=["empty", "garbage", "truncated"],
)
def test_a_corrupt_synthetic_png_is_named_before_ray_starts(tmp_path, corrupt):
    syn = tmp_path / "samples"
    for c in ("benign", "malignant"):
        for i in range(3):
            png(syn / c / f"{c}-{i}.png")
    bad = syn / "malignant" / "malignant-1.png"
    bad.write_bytes(bad.read_bytes()[:-30] if corrupt == "truncated" else corrupt)
    (tmp_path / "busi").mkdir()
    msg = refused(
        busdiff("evaluate", "--set", f"data.root={tmp_path / 'busi'}", "--set", f"evaluate.synthetic={syn}",
                "--set", f"evaluate.out={tmp_path / 'eval'}"),
        str(bad),
        "evaluate.synthetic",
    )
    assert msg.count("\n") == 0, msg
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    "case",
    ["phantom-into-a-file", "config-is-a-folder", "check-hash-size", "bad-yaml", "no-synthetic"],
)
def test_input_problems_show_one_message_never_a_traceback(tmp_path, case):
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.yaml").write_text("generate: [unclosed\n")
    args, needle = {
        "phantom-into-a-file": (["data", "phantom", str(tmp_path / "file")], str(tmp_path / "file")),
        "config-is-a-folder": (["config", str(tmp_path)], "is a folder"),
        "check-hash-size": (["data", "check", str(tmp_path), "--hash-size", "2"], "--hash-size"),
        "bad-yaml": (["generate", str(tmp_path / "bad.yaml")], "not valid YAML"),
        "no-synthetic": (["evaluate", "--set", f"data.root={tmp_path}"], "--set evaluate.synthetic="),
    }[case]
    msg = refused(busdiff(*args), "busdiff: error: ", needle)
    assert "pydantic" not in msg and "Input should" not in msg and "validation error" not in msg


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "file").write_text("x")
    r = busdiff("data", "phantom", str(tmp_path / "file"), "--debug")
    assert r.rc == 2 and "Traceback" in r.err and "busdiff: error: " in r.err


# ---- item 7: config errors before heavy imports, in busdiff's words ----


@pytest.mark.parametrize("command", ["generate", "finetune", "evaluate", "study", "serve", "demo", "config"])
def test_config_errors_come_before_torch_and_ray_in_busdiffs_words(command):
    r = busdiff(command, "--set", "generate.cout=3")
    msg = refused(r, "unknown field generate.cout; did you mean count?")
    assert "Extra inputs" not in msg


def test_job_scripts_refuse_the_same_way():
    refused(busdiff("--set", "generate.cout=3", script="jobs/generate.py"), "did you mean count?")


def test_list_syntax_is_shown_in_the_error_and_works():
    msg = refused(busdiff("config", "--set", "evaluate.classifier.seeds=0,1,2"))
    assert "--set evaluate.classifier.seeds=[0,1,2]" in msg
    ok = busdiff("config", "--set", "evaluate.classifier.seeds=[0,1,2]")
    assert ok.rc == 0 and "seeds:\n    - 0\n    - 1\n    - 2" in ok.out
    readme = (REPO / "README.md").read_text()
    assert "--set evaluate.classifier.seeds=[0,1,2]" in readme and "--debug" in readme


def test_unknown_choice_suggests_the_nearest():
    refused(busdiff("config", "--set", "model.preset=pretraned"), "model.preset", "did you mean pretrained?")


def test_an_empty_synthetic_folder_names_evaluate_synthetic(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "busi").mkdir()
    refused(
        busdiff("evaluate", "--set", f"evaluate.synthetic={tmp_path / 'samples'}",
                "--set", f"data.root={tmp_path / 'busi'}"),
        "evaluate.synthetic",
        "holds no images",
    )


@pytest.mark.parametrize("command", ["generate", "finetune", "serve"])
def test_a_missing_absolute_model_base_says_the_folder_does_not_exist(tmp_path, command):
    base = tmp_path / "models" / "stable-diffusion-v1-5"
    msg = refused(
        busdiff(command, "--set", "model.preset=pretrained", "--set", f"model.base={base}"),
        f"model.base={base}",
        "does not exist",
    )
    assert "hub" not in msg.split("does not exist")[0]


def test_a_hint_names_only_flags_the_command_has(tmp_path):
    root = tmp_path / "busi"
    png(root / "benign" / "benign (1).png")
    png(root / "benign" / "benign (1)_mask.png")
    (root / "benign" / "benign (2).png").write_bytes(b"broken")
    png(root / "benign" / "benign (2)_mask.png")
    msg = refused(busdiff("data", "check", str(root)), "benign (2).png", "--skip-bad")
    assert "data.skip_bad" not in msg and "--set" not in msg  # data check has no --set

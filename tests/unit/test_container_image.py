"""The Dockerfile (the node image cluster.yaml can name) checked as far as CI can without a Docker daemon:
it builds FROM cluster.yaml's image, every COPY source is in the repo and not ignored, and its install
steps work: the project's wheel builds from the files the image copies, installs with no other file of the
repo, and imports."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import yaml

from tests.conftest import REPO


def _instructions() -> list[tuple[str, str]]:
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines()]
    return [tuple(ln.split(None, 1)) for ln in lines if ln and not ln.startswith("#")]


def test_the_image_builds_on_cluster_yaml_s_ray_image():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    (base,) = [arg for op, arg in _instructions() if op == "FROM"]
    assert base == cluster["docker"]["image"]


def _copies() -> list[str]:
    sources = []
    for op, arg in _instructions():
        if op == "COPY":
            *src, _ = [a for a in shlex.split(arg) if not a.startswith("--")]
            sources += src
    return sources


def test_every_copy_source_exists_and_is_not_docker_ignored():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)  # never sent to the daemon: large, or not source
    for src in _copies():
        assert (REPO / src).exists(), src
        assert src.rstrip("/") not in ignored, src


def test_the_install_step_builds_a_wheel_that_installs_and_imports_alone(tmp_path):
    # the build context as the image sees it: only what the COPY lines bring
    ctx = tmp_path / "ctx"
    for src in _copies():
        dst = ctx / src
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
                            dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / src, dst)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"), str(ctx)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "w").glob("busdiff-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = "import busdiff.cli, busdiff.generate.pipeline, busdiff.study.run; print(busdiff.__file__)"
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith(str(target))  # the installed copy, not this checkout's

"""Fixtures shared by every test layer."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUSI256 = REPO.parent / "shared" / "datasets" / "busi-256"


@pytest.fixture(scope="session")
def busi256() -> Path:
    """The real BUSI copy beside the repo; tests that need it skip where it is absent (a user's clone)."""
    if not (BUSI256 / "manifest.csv").is_file():
        pytest.skip(f"real BUSI data not found at {BUSI256} (only present beside the project's own checkout)")
    return BUSI256


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, as in a one-CPU Ray worker: tiny models gain nothing from
    two, and OpenMP threads spin badly when the 2 cores are shared with the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RayStarted(BaseException):
    """Raised by ``forbid_ray_start``; a BaseException so that no ``except Exception`` swallows it."""


@pytest.fixture
def forbid_ray_start(monkeypatch):
    """Any call of ``ray.init`` fails the test: the CLI's connect, and the auto-init of Ray Train's
    ``fit`` or Ray Data, all go through it. For tests of errors that must come before Ray starts."""
    import ray

    def refuse(*args, **kwargs):
        raise RayStarted("ray.init was called: the error should have come before Ray starts")

    monkeypatch.setattr(ray, "init", refuse)


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: a shell's background job (``make test``
    runs tests/e2e with ``&``; CI may run the whole suite so) inherits SIGINT ignored, and Python then
    never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def s3(monkeypatch):
    """A real S3 API server on loopback (tests/s3.py) with one bucket, tests.s3.BUCKET."""
    from tests.s3 import s3_server

    with s3_server(monkeypatch) as server:
        yield server

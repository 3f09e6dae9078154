from __future__ import annotations

import pytest

from tests.e2e.harness import RayHead


@pytest.fixture(scope="session")
def ray_head():
    """One real head for the jobs of every module (each head start costs ~15 s of two busy cores); stopped
    (only its own processes) at the end. tests/e2e/test_serve_run.py starts its own: it needs a head on
    which Serve never ran."""
    with RayHead() as head:
        yield head

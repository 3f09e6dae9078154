from __future__ import annotations

import pytest

from tests.e2e.harness import RayHead


@pytest.fixture(scope="module")
def ray_head():
    """A real head for this module's jobs; stopped (only its own processes) at the end."""
    with RayHead() as head:
        yield head

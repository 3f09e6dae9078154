"""Fixtures shared by every test layer."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUSI256 = REPO.parent / "shared" / "datasets" / "busi-256"


@pytest.fixture(scope="session")
def busi256() -> Path:
    """The real BUSI copy beside the repo; tests that need it skip where it is absent (a user's clone)."""
    if not (BUSI256 / "manifest.csv").is_file():
        pytest.skip(f"real BUSI data not found at {BUSI256} (only present beside the project's own checkout)")
    return BUSI256

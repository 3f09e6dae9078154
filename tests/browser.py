"""Headless Chromium for tests that look at pages as a person would (Debian's chromium package)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--enable-logging=stderr",
    "--v=0",
]
CONSOLE_ERROR = re.compile(r"CONSOLE.*(error|Uncaught)|Uncaught|ERROR:CONSOLE", re.IGNORECASE)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium); page test not run")
    return path


def render(
    url: str, *, screenshot: Path | None = None, wait_ms: int = 30000, size: tuple[int, int] = (1200, 900)
) -> tuple[str, list[str]]:
    """Load ``url``, let its scripts run (virtual time), and return (DOM after scripts, console errors).
    With ``screenshot``, also write a PNG of the page."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        mode = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        cmd = [
            chromium(),
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={wait_ms}",
            *mode,
            url,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    errors = [
        line for line in r.stderr.splitlines() if "CONSOLE" in line.upper() and CONSOLE_ERROR.search(line)
    ]
    return r.stdout, errors

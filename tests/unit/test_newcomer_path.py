"""The README's first steps: after `make demo` / `make test`, the one line it gives puts the venv's
commands on PATH, and the README's command blocks use those commands by name."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_the_readme_line_after_the_two_commands_puts_busdiff_ray_and_serve_on_path():
    if not (REPO / ".venv" / "bin" / "activate").is_file():
        pytest.skip("no .venv in the repository (make test creates it); this test follows the README's line")
    head = README[: README.index("## ")]  # the part before the first section
    assert "make demo" in head and "make test" in head
    line = re.search(r"```bash\n(source \S+)\n```", head)
    assert line, "no activation line right after the two commands"
    r = subprocess.run(["bash", "-c", f"{line.group(1)} && command -v busdiff ray serve"], cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert all(str(REPO / ".venv" / "bin") in p for p in r.stdout.split())


def test_command_blocks_call_commands_by_name_not_by_venv_path():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert blocks
    assert not [ln for b in blocks for ln in b.splitlines() if ".venv/bin/" in ln and "activate" not in ln]

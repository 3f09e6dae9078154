"""Jobs as users run them: `ray job submit --working-dir .` against a real head on this machine."""

from __future__ import annotations

import json
import shutil

from busdiff.data.phantom import write_phantom


def test_data_check_job(ray_head, tmp_path):
    root = tmp_path / "busi"
    write_phantom(root, 3, seed=5, size=64)
    shutil.copy(root / "benign" / "benign (2).png", root / "normal" / "normal (4).png")
    (root / "normal" / "normal (4)_mask.png").write_bytes(
        (root / "normal" / "normal (1)_mask.png").read_bytes()
    )
    out = tmp_path / "out" / "report.json"

    r = ray_head.submit("python", "jobs/data_check.py", str(root), "--json", str(out))

    assert "connected to Ray: 2 CPUs" in r.stdout
    assert "succeeded" in r.stdout.lower() + r.stderr.lower()
    report = json.loads(out.read_text())
    assert report["n_images"] == 10
    assert ["benign_0002", "normal_0004"] in report["exact_duplicates"]
    assert any({lk["a"], lk["b"]} == {"benign_0002", "normal_0004"} for lk in report["leaks"])


def test_data_check_job_bad_input_fails_with_message(ray_head, tmp_path):
    r = ray_head.submit(
        "python",
        "jobs/data_check.py",
        str(tmp_path / "nowhere"),
        "--json",
        str(tmp_path / "r.json"),
        check=False,
    )
    assert r.returncode != 0
    assert str(tmp_path / "nowhere") in r.stdout + r.stderr

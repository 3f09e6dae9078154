"""Jobs as users run them: `ray job submit --working-dir .` against a real head on this machine."""

from __future__ import annotations

import json
import shutil
import subprocess

from busdiff.data.phantom import write_phantom
from tests.e2e.harness import BIN, REPO


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


def test_a_relative_output_path_is_refused_under_a_job_naming_the_field(ray_head):
    """The job runs in a temporary copy of --working-dir: a relative generate.out would vanish with it."""
    r = ray_head.submit("python", "jobs/generate.py", "jobs/configs/generate-tiny.yaml",
                        "--set", "generate.out=runs/generate-tiny", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "generate.out='runs/generate-tiny' is a relative path" in out and "temporary copy" in out
    assert "Traceback" not in out


def test_a_driver_without_the_clusters_token_setting_is_told_what_to_set(ray_head, tmp_path):
    """Ray 2.60's token auth: a client without RAY_AUTH_MODE=token gets one line saying what to set, not
    Ray's traceback."""
    env = {k: v for k, v in ray_head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["RAY_ADDRESS"] = f"127.0.0.1:{ray_head.port}"
    env["RAY_gcs_server_port_wait_time_s"] = "3"  # Ray retries the refused connection for 30 s by default
    r = subprocess.run(
        [str(BIN / "busdiff"), "generate", "jobs/configs/generate-tiny.yaml", "--set",
         f"generate.out={tmp_path}/gen"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "requires token authentication" in r.stderr and "RAY_AUTH_MODE=token" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "gen").exists()

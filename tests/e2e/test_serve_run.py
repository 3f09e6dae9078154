"""`serve run serve/config.yaml`, the way users start the service, against a real Ray head."""

from __future__ import annotations

import signal
import subprocess
import time

import requests
import yaml

from tests.e2e.harness import BIN, REPO, free_port


def test_serve_run_config_serves_api_and_gallery(ray_head, tmp_path):
    port = free_port()
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["set"] = ["serve.default_steps=2", "serve.default_size=32", "serve.min_size=32"]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))

    env = {**ray_head.env, "RAY_ADDRESS": f"127.0.0.1:{ray_head.port}"}
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", str(path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.monotonic() + 240, False
        while time.monotonic() < deadline and not ready and proc.poll() is None:
            try:
                ready = requests.get(f"{base}/readyz", timeout=5).status_code == 200
            except requests.RequestException:
                time.sleep(1)
        assert ready, f"not ready; serve run exited with {proc.poll()}"
        r = requests.post(f"{base}/v1/generate", json={"class": "benign", "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        page = requests.get(f"{base}/", timeout=30)
        assert page.status_code == 200 and "busdiff gallery" in page.text
        assert requests.get(f"{base}/openapi.json", timeout=30).json()["info"]["title"] == "busdiff"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

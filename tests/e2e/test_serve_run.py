"""`serve run serve/config.yaml`, the way users start the service, against a real Ray head."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import default_sigint
from tests.e2e.harness import BIN, REPO, RayHead, free_port

SMALL = ["serve.default_steps=2", "serve.default_size=32", "serve.min_size=32"]


@pytest.fixture(scope="module")
def ray_head():
    """This module's own head (not the session's shared one): its first test needs a head on which Serve
    has not started, and Serve stays on it afterwards."""
    with RayHead() as head:
        yield head


def _env(ray_head) -> dict[str, str]:
    env = {k: v for k, v in ray_head.env.items() if k != "BUSDIFF_SERVE_TOKEN"}
    return {**env, "RAY_ADDRESS": f"127.0.0.1:{ray_head.port}"}


def _serve_config(tmp_path: Path, port: int, host: str = "127.0.0.1") -> Path:
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"].update(host=host, port=port)
    config["applications"][0]["args"]["set"] = SMALL
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def _serve_run(ray_head, path: Path):
    log = (path.parent / "serve-run.log").open("w")  # a file: an unread pipe would fill and block it
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", str(path)], cwd=REPO, env=_env(ray_head), stdout=log, stderr=log,
        preexec_fn=default_sigint,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)  # serve run shuts Serve down on the way out
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _serve_started(ray_head) -> bool:
    return "ServeController" in ray_head.ray("list", "actors", "--filter", "state=ALIVE").stdout


def test_busdiff_serve_refuses_a_remote_host_without_token_before_binding(ray_head):
    """First in this module: it needs a head on which Serve has not started yet."""
    port = free_port()
    r = subprocess.run(
        [str(BIN / "busdiff"), "serve", "jobs/configs/serve-local.yaml"]
        + [a for kv in [*SMALL, "serve.host=0.0.0.0", f"serve.port={port}"] for a in ("--set", kv)],
        cwd=REPO,
        env=_env(ray_head),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "'0.0.0.0' is reachable from the network" in r.stderr, r.stderr[-3000:]
    assert not _serve_started(ray_head), "Serve was started before the refusal"
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} was bound before the refusal"


def test_serve_run_refuses_a_remote_http_host_without_token(ray_head, tmp_path):
    """`serve run` binds http_options.host itself, before it builds the app: the app checks that host
    (not serve.host, which stays 127.0.0.1 here) and refuses to deploy, so nothing is served."""
    port = free_port()
    with _serve_run(ray_head, _serve_config(tmp_path, port, host="0.0.0.0")):
        deadline, status = time.monotonic() + 240, {}
        while time.monotonic() < deadline and status.get("status") not in ("RUNNING", "DEPLOY_FAILED"):
            time.sleep(2)
            try:  # what `serve status` prints, from the dashboard's API
                status = ray_head.get("/api/serve/applications/").get("applications", {}).get("busdiff", {})
            except requests.RequestException:
                status = {}  # Serve's API answers only once its controller is up
        assert status.get("status") == "DEPLOY_FAILED", status
        assert "'0.0.0.0' is reachable from the network" in status.get("message", ""), status
        r = requests.post(f"http://127.0.0.1:{port}/v1/generate", json={"class": "benign"}, timeout=30)
        assert r.status_code != 200


def test_serve_run_config_serves_api_and_gallery(ray_head, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with _serve_run(ray_head, _serve_config(tmp_path, port)) as proc:
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

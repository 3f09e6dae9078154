"""A real Ray head for end-to-end tests: ``ray start --head`` on this machine with bounded CPUs,
``ray job submit`` through its job API on 127.0.0.1, and a stop that ends only this head's processes
(``ray stop`` would also end any other Ray cluster on the machine, such as the tests' shared one).
With ``autoscaling=`` a cluster config on Ray's fake multi-node provider (tests/e2e/fake-cluster.yaml), the
head runs the autoscaler, which starts and stops worker raylets on this machine as demand asks."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FIXED_DEFAULT_PORTS = (
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "runtime-env-agent",
    "metrics-export",
    "ray-client-server",
    "object-manager",
    "node-manager",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: the OS may hand a port just freed out again (seen in CI)."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


class RayHead:
    def __init__(
        self,
        num_cpus: int = 2,
        object_store_memory: int = 300 * 1024**2,
        autoscaling: dict[str, Any] | None = None,
    ) -> None:
        self.num_cpus = num_cpus
        self.autoscaling = autoscaling
        self.object_store_memory = object_store_memory
        self.port, self.dashboard_port, *self._fixed_ports = free_ports(2 + len(FIXED_DEFAULT_PORTS))
        # Short path: Ray's Unix socket paths must stay under ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="bdr", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # jobs' `python` is this venv's
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Ray 2.60 turns token auth on for a head when ~/.ray/auth_token exists (any local ray.init()
        # writes one); say so explicitly, with a token of this head's own, for the head and its clients.
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        if autoscaling is not None:
            # the fake provider refuses to run without RAY_FAKE_CLUSTER; the autoscaler looks every second
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.env = env

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> RayHead:
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_memory}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        # Ports with fixed defaults (agent 52365, client server 10001, ...) clash with any other Ray
        # cluster on this machine, such as the tests' shared one: the job agent then never comes up.
        fixed = zip(FIXED_DEFAULT_PORTS, self._fixed_ports, strict=True)
        cmd += [f"--{name}-port={port}" for name, port in fixed]
        if self.autoscaling is not None:
            config = {**self.autoscaling}
            config["provider"] = {**config["provider"], "gcs_address": f"127.0.0.1:{self.port}"}
            path = Path(self.temp_dir) / "autoscaling.yaml"
            path.write_text(yaml.safe_dump(config))
            cmd.append(f"--autoscaling-config={path}")
        try:
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
            if proc.returncode != 0:
                raise RuntimeError(f"ray start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            self._wait_for_job_agent()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_job_agent(self, timeout: float = 120) -> None:
        """The job API answers before the node's job agent registers ("No available agent"): wait
        until a trivial job is accepted."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.ray("job", "submit", "--no-wait", "--", "true", check=False, timeout=60)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job API at {self.address} not ready after {timeout}s:\n{r.stderr[-2000:]}"
                )
            time.sleep(1)

    def ray(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a ``ray`` CLI command against this head from the repo root."""
        env = {**self.env, "RAY_ADDRESS": self.address}
        r = subprocess.run(
            [str(BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"ray {' '.join(args)} -> {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
            )
        return r

    def nodes(self) -> list[dict[str, Any]]:
        """``ray list nodes --detail``: every node this head has known, the dead included."""
        r = self.ray("list", "nodes", "--detail", "--format=json", "--limit=1000", timeout=60)
        return json.loads(r.stdout)

    def get(self, route: str, timeout: float = 30) -> Any:
        """GET ``route`` of the dashboard's HTTP API with this head's token: JSON, no Ray import (a `ray`
        or `serve` CLI call costs seconds of CPU)."""
        import requests

        headers = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        r = requests.get(f"{self.address}{route}", headers=headers, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def submit(
        self, *entrypoint: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir . -- ENTRYPOINT``; waits and returns the job's output
        (``check=False`` for jobs expected to fail)."""
        return self.ray(
            "job", "submit", "--working-dir", ".", "--", *entrypoint, check=check, timeout=timeout
        )

    def _processes(self) -> list[psutil.Process]:
        marks = (self.temp_dir, f":{self.port}")
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or ())
            if any(m in cmd for m in marks):
                roots.append(p)
        procs = {p.pid: p for p in roots}
        for p in roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.update({c.pid: c for c in p.children(recursive=True)})
        return list(procs.values())

    def stop(self) -> None:
        procs = self._processes()
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

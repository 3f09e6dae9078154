"""Serving load benchmark: latency p50/p95/p99 and throughput at concurrency 1, 4 and 16, with dynamic
batching on and off, measured from a separate process over HTTP on 127.0.0.1 (bounded in count and time).

    python jobs/benchmarks/serve_load.py                                  # tiny preset, CPU
    python jobs/benchmarks/serve_load.py --preset sd15-shape --device cuda --size 512 --steps 25

Writes runs/benchmarks/serve_load.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONCURRENCY = (1, 4, 16)


def load(url: str, concurrency: int, n_requests: int, time_limit_s: float) -> dict:
    """Closed-loop load: ``concurrency`` clients, ``n_requests`` in all or until the time limit."""
    import requests

    deadline = time.monotonic() + time_limit_s
    latencies: list[float] = []
    codes: dict[int, int] = {}

    def client(k: int) -> None:
        session = requests.Session()
        i = k
        while i < n_requests and time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = session.post(url, json={"class": "benign", "seed": i}, timeout=300)
            latencies.append(time.perf_counter() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            i += concurrency

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "status_codes": codes,
        "throughput_rps": len(latencies) / wall,
        "p50_s": q[49],
        "p95_s": q[94],
        "p99_s": q[98],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "sd15-shape"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="requests per (mode, concurrency), at most")
    p.add_argument("--time-limit", type=float, default=60, help="seconds per (mode, concurrency), at most")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--out", default="runs/benchmarks/serve_load.json")
    p.add_argument("--client", nargs=3, metavar=("URL", "CONCURRENCY", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client:  # the load-generator process
        print(json.dumps(load(a.client[0], int(a.client[1]), int(a.client[2]), a.time_limit)))
        return 0

    import ray
    from ray import serve

    from busdiff.config import load_config
    from busdiff.serving.app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = [
        f"model.preset={a.preset}",
        f"model.device={a.device}",
        f"model.dtype={a.dtype}",
        f"serve.default_size={a.size}",
        f"serve.min_size={min(a.size, 64)}",
        f"serve.max_size={a.size}",
        f"serve.default_steps={a.steps}",
        f"serve.max_batch_size={a.max_batch_size}",
        "serve.max_replicas=1",
        "serve.max_ongoing_requests=64",
        "serve.max_queued_requests=256",
        f"serve.num_gpus_per_replica={1 if a.device == 'cuda' else 0}",
    ]
    ray.init(num_cpus=4, object_store_memory=500 * 1024**2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = []
    try:
        for batching in (True, False):
            name = "batching" if batching else "no-batching"
            cfg = load_config(None, [*common, f"serve.batching={str(batching).lower()}"])
            serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
            url = f"http://127.0.0.1:{port}/{name}/v1/generate"
            load(url, 1, 2, 60)  # warm-up
            for c in CONCURRENCY:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--time-limit",
                        str(a.time_limit),
                        "--client",
                        url,
                        str(c),
                        str(a.requests),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = {"batching": batching, **json.loads(out.stdout)}
                results.append(row)
                print(
                    f"{name:12s} c={c:<3d} {row['throughput_rps']:7.2f} req/s  p50 {row['p50_s']:.3f}s  "
                    f"p95 {row['p95_s']:.3f}s  p99 {row['p99_s']:.3f}s  codes {row['status_codes']}",
                    flush=True,
                )
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()

    by = {(r["batching"], r["concurrency"]): r for r in results}
    gain = by[(True, 16)]["throughput_rps"] / by[(False, 16)]["throughput_rps"]
    import platform

    import torch

    summary = {
        "benchmark": "serve_load",
        "preset": a.preset,
        "device": a.device,
        "size": a.size,
        "steps": a.steps,
        "machine": {
            "cpus": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "results": results,
        "batching_throughput_gain_at_16": gain,
        "target_gain": 1.5,
        "meets_target": gain >= 1.5,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"batching raises throughput at concurrency 16 by {gain:.2f}x (target >= 1.5x); wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

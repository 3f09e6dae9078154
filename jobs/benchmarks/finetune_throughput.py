"""Fine-tuning throughput: the Ray Train loop against a plain single-process loop doing the same steps on
the same model (busdiff.finetune.plain: same FinetuneModel, micro-batches, noise and optimizer), in
samples/s after warm-up, with 1 and 2 Ray Train workers, with and without gradient checkpointing and cached
latents (``--cache-latents off on``: each image VAE-encoded once per run instead of at every step).

    python jobs/benchmarks/finetune_throughput.py                       # tiny preset, CPU, 64 px
    python jobs/benchmarks/finetune_throughput.py --device cuda --preset sd15-shape --resolution 512 \
        --batch-size 4 --mixed-precision bf16 --gradient-checkpointing off on --cache-latents off on \
        --workers 1

On a GPU it also records peak GPU memory (torch.cuda.max_memory_allocated) of both loops.
Writes runs/benchmarks/finetune_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULT = Path("runs/benchmarks/finetune_throughput.json")


def overrides(
    a: argparse.Namespace, root: Path, out: Path, workers: int, checkpointing: bool, cache: bool = False
) -> list[str]:
    use_gpu = a.device == "cuda"
    return [
        f"data.root={root}",
        f"model.preset={a.preset}",
        f"model.device={a.device}",
        f"finetune.out={out}",
        "finetune.method=lora",
        f"finetune.lora.rank={a.rank}",
        f"finetune.lora.steps={a.steps}",
        f"finetune.lora.batch_size={a.batch_size}",
        f"finetune.resolution={a.resolution}",
        f"finetune.mixed_precision={a.mixed_precision}",
        f"finetune.gradient_checkpointing={str(checkpointing).lower()}",
        f"finetune.cache_latents={str(cache).lower()}",
        f"finetune.log_every={a.warmup}",
        f"finetune.report_every={a.report_every}",
        "finetune.checkpoint_every=0",
        "finetune.validation.every=0",
        "finetune.validation.n_per_class=1",
        "finetune.validation.steps=1",
        f"finetune.scaling.num_workers={workers}",
        f"finetune.scaling.use_gpu={str(use_gpu).lower()}",
        f"finetune.scaling.cpus_per_worker={a.cpus_per_worker}",
        f"ray.num_cpus={a.ray_cpus}",
        "ray.object_store_memory=300000000",
    ]


def plain(cfg, warmup: int) -> dict:
    """The single-process loop: same steps; samples/s over the steps after ``warmup``."""
    import torch

    from busdiff.finetune.plain import local_rows, plain_train
    from busdiff.finetune.trainer import prepare

    device = torch.device(cfg.model.device if cfg.model.device != "auto" else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = local_rows(cfg, prepare(cfg).records)
    run = plain_train(cfg, rows, device=device)
    secs, samples = sum(run.step_seconds[warmup:]), sum(run.samples_per_step[warmup:])
    out = {
        "samples_per_s": samples / secs,
        "steps": len(run.step_seconds),
        "timed_steps": len(run.step_seconds) - warmup,
    }
    if device.type == "cuda":
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def on_ray(cfg) -> dict:
    """The Ray Train loop; samples/s from its metrics.jsonl between the first log line (end of warm-up)
    and the last (the time excludes the final checkpoint and validation, includes report waits)."""
    from busdiff.finetune.trainer import run_finetune

    t0 = time.perf_counter()
    res = run_finetune(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(res.out) / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    world = cfg.finetune.scaling.num_workers
    samples = (last["step"] - first["step"]) * cfg.finetune.lora.batch_size * world
    out = {
        "samples_per_s": samples / (last["train_seconds"] - first["train_seconds"]),
        "steps": last["step"],
        "timed_steps": last["step"] - first["step"],
        "wall_s_including_startup": wall,
    }
    if "gpu_peak_gib" in last:
        out["gpu_peak_gib"] = last["gpu_peak_gib"]
    return out


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    model = platform.processor() or "unknown model"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=["tiny", "sd15-shape"], default="tiny")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="per worker")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--gradient-checkpointing", nargs="+", choices=["off", "on"], default=["off"])
    p.add_argument("--cache-latents", nargs="+", choices=["off", "on"], default=["off"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="Ray Train workers; 0: no Ray")
    p.add_argument("--steps", type=int, default=110, help="optimizer steps per run, warm-up included")
    p.add_argument(
        "--warmup", type=int, default=10, help="steps left out of the timing (also the log interval)"
    )
    p.add_argument("--report-every", type=int, default=50, help="finetune.report_every (the config default)")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--repeats", type=int, default=2, help="runs of each loop; the median is reported")
    p.add_argument("--out", default=str(RESULT))
    a = p.parse_args()

    import torch

    from busdiff.config import load_config
    from busdiff.data.phantom import write_phantom

    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    # The Ray worker runs with OMP_NUM_THREADS = its CPUs: give the plain loop the same threads.
    torch.set_num_threads(max(1, int(a.cpus_per_worker)))
    tmp = Path(tempfile.mkdtemp(prefix="busdiff-ftbench-"))
    root = tmp / "busi"
    need = a.batch_size * max(1, *a.workers)
    write_phantom(root, max(2, math.ceil(need / 3 / 0.7) + 1), seed=0, size=max(64, a.resolution))
    a.workers = [w for w in a.workers if w > 0]  # --workers 0: the plain loop alone (a GPU image has no Ray)
    if a.workers:
        from busdiff.raycluster import connect

        connect(load_config(None, overrides(a, root, tmp / "x", 1, False)).ray)

    results = []
    for gc, cl in [(gc, cl) for gc in a.gradient_checkpointing for cl in a.cache_latents]:
        checkpointing, cache = gc == "on", cl == "on"
        cfg1 = load_config(None, overrides(a, root, tmp / "unused", 1, checkpointing, cache))
        row: dict = {"gradient_checkpointing": checkpointing, "cache_latents": cache, "plain": []}
        usable = [w for w in a.workers if a.device != "cuda" or w <= torch.cuda.device_count()]
        for w in set(a.workers) - set(usable):
            row[f"ray_{w}w"] = {"skipped": f"{w} workers need {w} GPUs; {torch.cuda.device_count()} here"}
        for w in usable:
            row[f"ray_{w}w"] = {"runs": []}
        # Interleaved (plain, ray 1w, ray 2w, plain, ...): load from other processes hits all loops alike.
        for i in range(a.repeats):
            row["plain"].append(plain(cfg1, a.warmup))
            for w in usable:
                out = tmp / f"ray-{gc}-{cl}-{w}-{i}"
                cfg = load_config(None, overrides(a, root, out, w, checkpointing, cache))
                row[f"ray_{w}w"]["runs"].append(on_ray(cfg))
        row["plain_samples_per_s"] = statistics.median(r["samples_per_s"] for r in row["plain"])
        for w in usable:
            runs = row[f"ray_{w}w"]["runs"]
            row[f"ray_{w}w"]["samples_per_s"] = statistics.median(r["samples_per_s"] for r in runs)
            ratios = [
                r["samples_per_s"] / p["samples_per_s"] for r, p in zip(runs, row["plain"], strict=True)
            ]
            row[f"ray_{w}w"]["ratio_vs_plain_per_repeat"] = ratios
            row[f"ray_{w}w"]["ratio_vs_plain"] = statistics.median(ratios)
        results.append(row)

    doc = {
        "benchmark": "finetune_throughput",
        "machine": machine(a.device),
        "note": "other processes may share this machine: loops run interleaved, figures are medians of "
        "--repeats runs, 'vs plain' is the median of per-repeat ratios",
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "target": "ray_1w ratio_vs_plain >= 0.85",
        "results": results,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")

    print(
        f"\nfine-tuning throughput, {a.preset} {a.resolution}px batch {a.batch_size}/worker LoRA r{a.rank} "
        f"{a.mixed_precision}, {a.steps} steps ({a.warmup} warm-up) on {doc['machine']}"
    )
    print(f"{'grad ckpt':<10}{'cached':<8}{'loop':<16}{'samples/s':>10}{'vs plain':>10}{'peak GiB':>10}")
    for row in results:
        gc, cl = ("on" if row[k] else "off" for k in ("gradient_checkpointing", "cache_latents"))
        lead = f"{gc:<10}{cl:<8}"
        peak = row["plain"][0].get("gpu_peak_gib")
        print(
            f"{lead}{'plain (1 proc)':<16}{row['plain_samples_per_s']:>10.2f}{1.0:>10.2f}"
            f"{(f'{peak:.2f}' if peak else '-'):>10}"
        )
        for w in a.workers:
            r = row.get(f"ray_{w}w", {})
            if "samples_per_s" not in r:
                print(f"{lead}{f'ray train {w}w':<16}{'skipped: ' + r.get('skipped', ''):>30}")
                continue
            peak = r["runs"][0].get("gpu_peak_gib")
            vs = r["ratio_vs_plain"]
            peak_txt = f"{peak:.2f}" if peak else "-"
            print(f"{lead}{f'ray train {w}w':<16}{r['samples_per_s']:>10.2f}{vs:>10.2f}{peak_txt:>10}")
    print(f"result: {a.out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation throughput: the Ray Data pipeline (busdiff.generate) against a plain single-process diffusers
loop over the same plan, and, on a GPU, the paper's way against busdiff's best.

CPU (default): tiny preset, 256 images at 64 px, text2img then img2img, PNGs written by both sides.
    python jobs/benchmarks/generate_throughput.py
    variants: loop-1t / loop-2t (plain loop, torch on 1 / 2 threads; the faster is the reference),
              ray-1 / ray-2 (the pipeline, 1 / 2 actors per stage)

GPU (--gpu-recipe): the paper's settings at 512 px (sd15-shape, or --preset pretrained --base DIR):
DPMSolverMultistep 50 steps, then img2img at strength 0.3 (50 nominal, 15 run).
    python jobs/benchmarks/generate_throughput.py --gpu-recipe --device cuda
    variants: paper     batch 1, fp16, one image after another, decoded-image hand-off (PIL), PNGs
              best      batch --batch-size, bf16, SDPA, channels_last, torch.compile'd UNet, latent hand-off
              best-ray  the same through the Ray Data pipeline, both stages sharing the GPU (--with-ray)
    set against the arithmetic floor of REFERENCE.md: 0.14 s per hybrid image per H100 (7.1 images/s).

``images_per_s`` counts the whole run (model load and, for Ray, actor start-up included);
``steady_images_per_s`` counts from the first model call to the last file written. Writes
runs/benchmarks/generate_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from busdiff.config import load_config
from busdiff.generate.plan import build_plan
from busdiff.generate.sink import package_versions
from busdiff.generate.stages import Img2Img, Text2Img, set_scheduler
from busdiff.models.presets import load_pipelines, resolve_device
from busdiff.storage import write_bytes, write_text

FLOOR_S_PER_IMAGE = 0.14  # REFERENCE.md: ~111 TFLOP per hybrid image at ~790 TFLOP/s bf16 on an H100


def _config(a: argparse.Namespace, out: str, actors: int = 1, best: bool = False):
    sets = [
        f"model.preset={a.preset}",
        f"model.device={a.device}",
        f"model.base={a.base}",
        f"model.dtype={'bfloat16' if best else a.dtype}",
        f"generate.out={out}",
        f"generate.total={a.images}",
        f"generate.size={a.size}",
        f"generate.steps={a.steps}",
        f"generate.refine_steps={a.refine_steps}",
        f"generate.strength={a.strength}",
        f"generate.handoff={'latent' if best else 'image'}",
        f"generate.channels_last={best}",
        f"generate.compile={best and a.compile}",
        f"ray.num_cpus={a.ray_cpus}",
    ]
    for stage in ("text2img", "img2img"):
        sets += [
            f"generate.{stage}.actors={actors}",
            f"generate.{stage}.batch_size={a.batch_size}",
            f"generate.{stage}.num_cpus={a.actor_cpus}",
            f"generate.{stage}.num_gpus={a.actor_gpus}",
        ]
    return load_config(None, sets)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(cfg, out: Path, batch: int, threads: int | None = None) -> dict[str, Any]:
    """The baseline: diffusers' own pipelines in one process, batch after batch, PNGs written."""
    if threads:
        torch.set_num_threads(threads)
    g, t0 = cfg.generate, time.perf_counter()
    device = resolve_device(cfg.model.device)
    txt, img = load_pipelines(cfg.model, device)
    set_scheduler(txt, g.scheduler)
    set_scheduler(img, g.scheduler)
    rows = build_plan(cfg).rows
    t1 = time.perf_counter()
    for k in range(0, len(rows), batch):
        part = rows[k : k + batch]
        gens = [torch.Generator("cpu").manual_seed(r["seed"]) for r in part]
        first = txt(
            [r["prompt"] for r in part],
            num_inference_steps=g.steps,
            guidance_scale=g.guidance,
            height=g.size,
            width=g.size,
            generator=gens,
            output_type="pil",
        ).images
        gens = [torch.Generator("cpu").manual_seed(r["refine_seed"]) for r in part]
        refined = img(
            [r["prompt"] for r in part],
            image=first,
            strength=g.strength,
            num_inference_steps=g.refine_steps,
            guidance_scale=g.refine_guidance,
            generator=gens,
            output_type="np",
        ).images
        for r, im in zip(part, refined, strict=True):
            write_bytes(out / r["label"] / f"{r['id']}.png", _png((im * 255).round().astype(np.uint8)))
    _sync(device)
    t2 = time.perf_counter()
    return {
        "images": len(rows),
        "seconds": t2 - t0,
        "steady_seconds": t2 - t1,
        "batch_size": batch,
        "torch_threads": torch.get_num_threads(),
    }


def best_loop(cfg, out: Path, batch: int) -> dict[str, Any]:
    """busdiff's stages in one process: batches, bf16, channels_last, compiled UNet, latent hand-off;
    one warm-up batch (compilation) is timed apart."""
    g, t0 = cfg.generate, time.perf_counter()
    speed = dict(scheduler=g.scheduler, channels_last=g.channels_last, compile=g.compile)
    t2i = Text2Img(cfg.model, g.steps, g.guidance, g.size, output="latent", **speed)
    i2i = Img2Img(cfg.model, g.refine_steps, g.refine_guidance, g.strength, **speed)
    rows = build_plan(cfg).rows
    cols = ("id", "label", "prompt", "negative_prompt", "seed", "refine_seed")

    def run(part: list[dict[str, Any]]) -> None:
        res = i2i(t2i({c: np.array([r[c] for r in part]) for c in cols}))
        for r, im in zip(part, res["refined"], strict=True):
            write_bytes(out / r["label"] / f"{r['id']}.png", _png(im))

    run(rows[:batch])  # warm-up: compilation and autotuning
    device = resolve_device(cfg.model.device)
    _sync(device)
    t1 = time.perf_counter()
    for k in range(0, len(rows), batch):
        run(rows[k : k + batch])
    _sync(device)
    t2 = time.perf_counter()
    return {
        "images": len(rows),
        "seconds": t2 - t0,
        "steady_seconds": t2 - t1,
        "warmup_seconds": t1 - t0,
        "batch_size": batch,
    }


def ray_pipeline(cfg) -> dict[str, Any]:
    from busdiff.generate.pipeline import run_generate

    res = run_generate(cfg)
    return {
        "images": res.written,
        "seconds": res.seconds,
        "steady_seconds": res.busy_seconds,
        "stages": {k: vars(v) for k, v in res.stages.items()},
        "actors": cfg.generate.text2img.actors,
        "batch_size": cfg.generate.text2img.batch_size,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-recipe", action="store_true", help="the paper's settings at 512 px (for a GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--preset", default=None, choices=["tiny", "sd15-shape", "pretrained"])
    p.add_argument(
        "--base", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="with --preset pretrained"
    )
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--refine-steps", type=int, default=None)
    p.add_argument("--strength", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="Ray variants: actors per stage")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="plain-loop torch thread counts")
    p.add_argument("--actor-cpus", type=float, default=1)
    p.add_argument("--actor-gpus", type=float, default=None)
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster (at least)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--with-ray", action="store_true", help="GPU recipe: also run best through Ray Data")
    p.add_argument("--variants", nargs="+", default=None, help="run only these variants")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all variants; the median is reported")
    p.add_argument("--json", default="runs/benchmarks/generate_throughput.json")
    a = p.parse_args()
    gpu = a.gpu_recipe
    a.preset = a.preset or ("sd15-shape" if gpu else "tiny")
    a.dtype = a.dtype or ("float16" if gpu else "float32")
    a.images = a.images or (128 if gpu else 256)
    a.size = a.size or (512 if gpu else 64)
    a.steps = a.steps or (50 if gpu else 30)
    a.refine_steps = a.refine_steps or (50 if gpu else 30)
    a.batch_size = a.batch_size or (16 if gpu else 8)
    a.actor_gpus = a.actor_gpus if a.actor_gpus is not None else (0.5 if gpu else 0)
    device = resolve_device(a.device)
    # (name, run(out_dir)) in the order they run; --repeat alternates them against load drift.
    variants: list[tuple[str, Any]] = []
    if gpu:
        variants.append(("paper", lambda out: plain_loop(_config(a, str(out)), out, batch=1)))
        variants.append(("best", lambda out: best_loop(_config(a, str(out), best=True), out, a.batch_size)))
        if a.with_ray:
            variants.append(("best-ray", lambda out: ray_pipeline(_config(a, str(out), best=True))))
    else:
        for t in a.threads:
            variants.append(
                (f"loop-{t}t", lambda out, t=t: plain_loop(_config(a, str(out)), out, a.batch_size, t))
            )
        for n in a.actors:
            variants.append((f"ray-{n}", lambda out, n=n: ray_pipeline(_config(a, str(out), actors=n))))
    variants = [(k, f) for k, f in variants if a.variants is None or k in a.variants]
    if any(k.startswith(("ray", "best-ray")) for k, _ in variants):
        from busdiff.raycluster import connect

        # Logical CPUs: every actor's plus room for the writer tasks, so the widest variant never stalls.
        a.ray_cpus = max(a.ray_cpus, math.ceil(2 * max(a.actors) * a.actor_cpus + 1))
        connect(_config(a, "unused").ray)

    tmp = Path(tempfile.mkdtemp(prefix="genbench-"))
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k, _ in variants}
    load = {"before": os.getloadavg()}
    try:
        for r in range(a.repeat):
            for name, fn in variants:
                res = fn(tmp / f"{name}-{r}")
                res["images_per_s"] = res["images"] / res["seconds"]
                res["steady_images_per_s"] = res["images"] / res["steady_seconds"]
                runs[name].append(res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load["after"] = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        median = sorted(rs, key=lambda x: x["images_per_s"])[len(rs) // 2]
        results[name] = {
            **median,
            "all_images_per_s": [round(x["images_per_s"], 3) for x in rs],
            "all_steady_images_per_s": [round(x["steady_images_per_s"], 3) for x in rs],
        }
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15": load,
        },
        "packages": package_versions(),
        "settings": {k: v for k, v in vars(a).items() if k not in ("json", "variants")},
        "variants": results,
    }
    loops = {k: v for k, v in results.items() if k.startswith("loop")}
    if loops:
        ref_name = max(loops, key=lambda k: loops[k]["images_per_s"])
        ref = loops[ref_name]
        report["reference"] = ref_name
        report["ratios"] = {
            k: {
                "images_per_s": v["images_per_s"] / ref["images_per_s"],
                "steady_images_per_s": v["steady_images_per_s"] / ref["steady_images_per_s"],
            }
            for k, v in results.items()
            if k.startswith("ray")
        }
    if gpu and device.type == "cuda":  # the floor is an H100's; on a CPU it means nothing
        report["floor_images_per_s"] = 1 / FLOOR_S_PER_IMAGE
        report["share_of_floor"] = {
            k: v["steady_images_per_s"] * FLOOR_S_PER_IMAGE for k, v in results.items()
        }
    write_text(a.json, json.dumps(report, indent=2) + "\n")

    print(
        f"generation throughput ({report['machine']['device']}, preset {a.preset}, {a.size} px, "
        f"{a.steps} + img2img {a.refine_steps} x {a.strength} steps, {a.images} images)"
    )
    last = "floor" if gpu else "vs ref (steady)"
    print(f"{'variant':<10}{'images':>8}{'seconds':>10}{'images/s':>10}{'steady/s':>10}  {last}")
    for k, v in results.items():
        if "share_of_floor" in report:
            extra = f"{report['share_of_floor'][k]:.1%} of {report['floor_images_per_s']:.2f}/s"
        elif k in report.get("ratios", {}):
            r = report["ratios"][k]
            extra = f"{r['images_per_s']:.2f} ({r['steady_images_per_s']:.2f})"
        else:
            extra = "reference" if k == report.get("reference") else ""
        print(
            f"{k:<10}{v['images']:>8}{v['seconds']:>10.1f}{v['images_per_s']:>10.2f}"
            f"{v['steady_images_per_s']:>10.2f}  {extra}"
        )
    print(f"written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

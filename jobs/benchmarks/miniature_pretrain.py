"""The miniature base model: pretraining time per phase, the VAE's held-out PSNR, and FID of samples.

    python jobs/benchmarks/miniature_pretrain.py                  # default recipe (cached after one run)
    python jobs/benchmarks/miniature_pretrain.py --fresh          # pretrain again into a temporary cache
    python jobs/benchmarks/miniature_pretrain.py --set unet_steps=400 --set unet_lr=2e-3   # recipe variants

FID (busdiff.evaluate's offline Inception) of ~100 images against ~100 held-out phantoms (a phantom seed
the pretraining never saw), for: the pretrained model's samples (the training caption, DPMSolverMultistep,
``--steps``, guidance ``--guidance``), the untrained model of the same recipe (the start), the VAE's
reconstructions of the held-out phantoms (the ceiling this VAE allows), and other real phantoms (the
real-vs-real floor at this sample size). Writes runs/benchmarks/miniature_pretrain.json and a sample grid
runs/benchmarks/miniature_samples.png (rows: real, VAE reconstruction, samples, samples with the three
class prompts, untrained samples), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

RESULT = Path("runs/benchmarks/miniature_pretrain.json")
GRID = Path("runs/benchmarks/miniature_samples.png")


def save_pngs(images: np.ndarray, folder: Path) -> Path:
    """uint8 N×H×W×3 (or floats in [0, 1]) -> folder/000.png, ..."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        arr = im if im.dtype == np.uint8 else (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return folder


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """N×3×H×W in [-1, 1] -> uint8 N×H×W×3."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def sample(pipe, prompt: str, n: int, steps: int, guidance: float, seed: int, batch: int = 34) -> np.ndarray:
    out = []
    for i in range(0, n, batch):
        k = min(batch, n - i)
        gen = [torch.Generator().manual_seed(seed + i + j) for j in range(k)]
        r = pipe(
            [prompt] * k, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np"
        )
        out.append(r.images)
    return (np.clip(np.concatenate(out), 0, 1) * 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=None, help="default: the recipe's (runs/cache/miniature)")
    p.add_argument("--fresh", action="store_true", help="pretrain into a temporary cache (measures time)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="recipe override")
    p.add_argument("--n-per-class", type=int, default=34, help="images per class in each FID set")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--fid-cache", default="runs/cache", help="Inception weights and feature cache")
    p.add_argument("--json", type=Path, default=RESULT)
    p.add_argument("--grid", type=Path, default=GRID)
    a = p.parse_args(argv)

    torch.set_num_threads(1)  # as the pretraining; two threads were slower on the shared 2-core machine
    from diffusers import StableDiffusionPipeline

    from busdiff.config import MiniatureConfig
    from busdiff.evaluate.compare import run_fid
    from busdiff.generate.prompts import render_prompt
    from busdiff.models.miniature import build_miniature, encode, phantom_images, pretrain_miniature, psnr
    from busdiff.viz import image_grid

    fields = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    tmp = Path(tempfile.mkdtemp(prefix="miniature-bench-"))
    if a.fresh:
        fields["cache_dir"] = str(tmp / "cache")
    elif a.cache_dir:
        fields["cache_dir"] = a.cache_dir
    cfg = MiniatureConfig(**fields)
    try:
        t = time.perf_counter()
        folder = pretrain_miniature(cfg)
        wall = time.perf_counter() - t
        metrics = json.loads((folder / "metrics.json").read_text())

        # Held-out phantoms (another data seed: never trained on) and a second real set for the floor.
        n = a.n_per_class
        held = phantom_images(cfg.model_copy(update={"data_seed": cfg.data_seed + 1}), 0, n)
        other = phantom_images(cfg.model_copy(update={"data_seed": cfg.data_seed + 2}), 0, n)
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            mean, _ = encode(pipe.vae, held)
            recon = torch.cat([pipe.vae.decode(mean[i : i + 64]).sample for i in range(0, len(mean), 64)])
        t = time.perf_counter()
        samples = sample(pipe, cfg.caption, 3 * n, a.steps, a.guidance, seed=1000)
        s_per_image = (time.perf_counter() - t) / (3 * n)
        by_class = {c: sample(pipe, render_prompt(c), 8, a.steps, a.guidance, seed=2000) for c in
                    ("benign", "malignant", "normal")}
        untrained_pipe = StableDiffusionPipeline(**build_miniature(cfg), requires_safety_checker=False)
        untrained_pipe.set_progress_bar_config(disable=True)
        untrained = sample(untrained_pipe, cfg.caption, 3 * n, a.steps, a.guidance, seed=1000)

        sets = {
            "samples": samples,
            "untrained": untrained,
            "vae_reconstructions": to_uint8(recon),
            "real_floor": to_uint8(other),
        }
        held_dir = save_pngs(to_uint8(held), tmp / "held_out")
        fids = {}
        for name, images in sets.items():
            r = run_fid(save_pngs(images, tmp / name), held_dir, cache_dir=a.fid_cache, device="cpu",
                        kid_subsets=50)
            fids[name] = {"fid": round(r["fid"], 2), "kid": round(r["kid"], 4), "n": r["a"]["n"]}
            print(f"FID {name:20s} {r['fid']:8.2f}   KID {r['kid']:.4f}", flush=True)

        real_u8 = to_uint8(held)
        rows = [real_u8[::n // 3 + 1][:8], to_uint8(recon)[::n // 3 + 1][:8], samples[:8], samples[8:16]]
        labels = ["real held-out", "VAE recon", "samples", "samples"]
        for c, ims in by_class.items():
            rows.append(ims)
            labels.append(f"prompt: {c}")
        rows.append(untrained[:8])
        labels.append("untrained")
        a.grid.parent.mkdir(parents=True, exist_ok=True)
        image_grid(rows, row_labels=labels, cell=96).save(a.grid)

        result = {
            "benchmark": "miniature_pretrain",
            "recipe": cfg.model_dump(),
            "folder": str(folder),
            "cached": not a.fresh and wall < 0.5 * metrics["seconds"]["total"],
            "pretrain_seconds": metrics["seconds"],
            "pretrain_cpu_seconds": metrics.get("cpu_seconds"),
            "vae_psnr_held_out_db": metrics["vae_psnr_held_out_db"],
            "vae_psnr_fid_set_db": round(psnr(recon.clamp(-1, 1), held), 3),
            "unet_final_loss": metrics["unet_final_loss"],
            "parameters": metrics["parameters"],
            "sampling": {"scheduler": type(pipe.scheduler).__name__, "steps": a.steps,
                         "guidance": a.guidance, "seconds_per_image": round(s_per_image, 4)},
            "fid_vs_held_out": fids,
            "grid": str(a.grid),
            "host": {"python": sys.version.split()[0], "machine": platform.machine(),
                     "torch": torch.__version__, "threads": 1},
        }
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("pretrain_seconds", "vae_psnr_held_out_db")}))
        print(f"wrote {a.json} and {a.grid}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Seconds per guided UNet pass (batch 2: conditional + unconditional, fp32) of each built-in base model
on this machine's CPU, for 512 px images (latents of 512 / the VAE's downsampling): the figures behind
busdiff's warning that a recipe cannot finish on CPUs (busdiff/estimate.py). Writes JSON.

    python jobs/benchmarks/cpu_unet_pass.py runs/benchmarks/cpu_unet_pass.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch

from busdiff.models.miniature import build_miniature
from busdiff.models.presets import build_components


def _seconds_per_pass(comps: dict, size: int = 512, repeats: int = 3) -> float:
    unet, vae = comps["unet"].eval(), comps["vae"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = size // factor
    x, t = torch.randn(2, unet.config.in_channels, side, side), torch.tensor([500, 500])
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            unet(x, t, ctx)
            times.append(time.perf_counter() - t0)
    return round(min(times[1:]), 3)


def main(out: str) -> None:
    torch.manual_seed(0)
    res = {
        "what": "UNet forward for 512 px images, batch 2 (a guided step), fp32, CPU; min of the 2nd-3rd pass",
        "seconds_per_pass": {
            "tiny": _seconds_per_pass(build_components("tiny")),
            "miniature": _seconds_per_pass(build_miniature()),
            "sd15-shape": _seconds_per_pass(build_components("sd15-shape")),
        },
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/benchmarks/cpu_unet_pass.json")

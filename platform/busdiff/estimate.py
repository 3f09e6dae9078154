"""A recipe that cannot finish where it will run: long work on CPUs (the built-in defaults are the paper's
recipe, 512 px, 50 steps, 900 images) is warned about, with an estimate, before it starts. Read from the
config alone: no model is loaded for it."""

from __future__ import annotations

import json
from pathlib import Path

from busdiff.config import BusdiffConfig, ModelConfig

#: Seconds per guided UNet pass (batch 2: conditional + unconditional) for 512 px images, fp32, on this
#: project's 2-core CPU, by base model (jobs/benchmarks/cpu_unet_pass.py; SD 1.5 measured 11-19 s with
#: the machine idle to loaded). A training step on one image costs about the same (a forward at batch 1
#: and its backward, ~3 forwards at batch 1).
CPU_SECONDS_PER_PASS = {"tiny": 0.8, "miniature": 0.55, "sd15": 12.0}

#: Warn when the estimate exceeds this many hours.
WARN_HOURS = 1.0


def base_kind(model: ModelConfig) -> str | None:
    """Which measured figure fits the base model: ``tiny``, ``miniature``, ``sd15`` (``sd15-shape``, a hub
    id: SD 1.5 is the default, or a local folder whose UNet is as wide as SD 1.5's); None for a local
    folder of another size."""
    if model.preset in ("tiny", "miniature"):
        return model.preset
    if model.preset == "sd15-shape":
        return "sd15"
    unet_config = Path(model.base) / "unet" / "config.json"
    if not unet_config.is_file():
        return None if Path(model.base).exists() else "sd15"
    return "sd15" if max(json.loads(unet_config.read_text()).get("block_out_channels", [0])) >= 1280 else None


def _passes_generate(cfg: BusdiffConfig) -> float:
    g = cfg.generate
    n = g.total or (sum(g.count.values()) if isinstance(g.count, dict) else 3 * g.count)
    per = g.steps * (2 if g.guidance > 1 else 1) / 2  # a pass is batch 2
    if g.refine:
        per += int(g.refine_steps * g.strength) * (2 if g.refine_guidance > 1 else 1) / 2
    return n * per * (g.size / 512) ** 2


def _passes_finetune(cfg: BusdiffConfig) -> float:
    f = cfg.finetune
    images = 0
    if f.method in ("lora", "lora+ti", "lora-then-ti"):
        images += f.lora.steps * f.lora.batch_size * f.lora.grad_accum
    if f.method in ("ti", "lora-then-ti"):
        images += f.ti.steps * f.ti.batch_size * f.ti.grad_accum
    return images * (f.resolution / 512) ** 2  # per worker: workers run in parallel


def cpu_estimate(cfg: BusdiffConfig, command: str) -> str | None:
    """A warning with an estimate when ``command`` (finetune, generate, study) would run for more than
    :data:`WARN_HOURS` on CPUs; None otherwise. GPUs come from the config (a finetune's
    ``scaling.use_gpu``, generate's ``text2img.num_gpus``), or from ``model.device: cuda``."""
    kind = base_kind(cfg.model)
    if kind is None or cfg.model.device == "cuda":
        return None
    passes = 0.0
    if command in ("finetune", "study") and not cfg.finetune.scaling.use_gpu:
        passes += _passes_finetune(cfg)
    if command in ("generate", "study") and cfg.generate.text2img.num_gpus == 0:
        arms = sum(a.synthetic for a in cfg.study.configurations) if command == "study" else 1
        actors = cfg.generate.text2img.actors
        passes += arms * _passes_generate(cfg) / (actors if isinstance(actors, int) else actors[1])
    seconds = CPU_SECONDS_PER_PASS[kind]
    hours = passes * seconds / 3600
    if hours < WARN_HOURS:
        return None
    model = cfg.model.base if cfg.model.preset == "pretrained" else f"the {cfg.model.preset} model"
    return (
        f"busdiff {command}: warning: this recipe cannot finish soon on CPUs: {model}, about {passes:,.0f} "
        f"UNet passes at ~{seconds:g} s each (measured on a 2-core CPU), about {hours:,.0f} hours. Give it "
        "GPUs (finetune.scaling.use_gpu, generate.text2img.num_gpus) or a small recipe "
        "(jobs/configs/*-tiny.yaml), or run `busdiff demo` for the embedded default."
    )

"""Text2Img and Img2Img stages as callable classes: Ray Data actors (``map_batches``) and Serve
replicas construct one, which loads the model once, then call it on column batches.

A batch is a dict of numpy arrays: ``id``, ``label``, ``prompt``, ``seed`` (and ``refine_seed`` for
img2img). Text2Img adds ``t2i`` (uint8 N×H×W×3); Img2Img refines ``t2i`` into ``refined``.
Every image has its own seeded generator, so an image does not depend on the batch it landed in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from busdiff.config import ModelConfig
from busdiff.models.presets import load_pipelines, resolve_device


def _generators(seeds: np.ndarray) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same starting noise on any device.
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


class Text2Img:
    def __init__(self, model: dict[str, Any], steps: int, guidance: float, size: int) -> None:
        cfg = ModelConfig(**model)
        self.device = resolve_device(cfg.device)
        self.pipe, _ = load_pipelines(cfg, self.device)
        self.steps, self.guidance, self.size = steps, guidance, size

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.pipe(
            prompt=[str(p) for p in batch["prompt"]],
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            height=self.size,
            width=self.size,
            generator=_generators(batch["seed"]),
            output_type="np",
        )
        return {**batch, "t2i": _to_uint8(out.images)}


class Img2Img:
    def __init__(self, model: dict[str, Any], steps: int, guidance: float, strength: float) -> None:
        cfg = ModelConfig(**model)
        self.device = resolve_device(cfg.device)
        _, self.pipe = load_pipelines(cfg, self.device)
        self.steps, self.guidance, self.strength = steps, guidance, strength

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.pipe(
            prompt=[str(p) for p in batch["prompt"]],
            image=[Image.fromarray(a) for a in batch["t2i"]],
            strength=self.strength,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=_generators(batch["refine_seed"]),
            output_type="np",
        )
        return {**batch, "refined": _to_uint8(out.images)}

"""The hybrid model one Serve replica holds: text2img and img2img sharing one set of components
(base + adapters), run on groups of single-image work items so requests can be batched together.

A diffusers pipeline call is not reentrant (the scheduler's step state and the pipeline's own
per-call attributes are shared), so :meth:`HybridModel.run` runs one call at a time."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from busdiff.config import CLASSES, ModelConfig, ServeConfig
from busdiff.generate.plan import adapter_hash
from busdiff.generate.prompts import DEFAULT_TOKEN, render_prompt
from busdiff.generate.stages import set_scheduler
from busdiff.models.adapters import adapter_class_tokens, load_adapters
from busdiff.models.presets import load_pipelines, model_id, resolve_device

REFINE_SEED_OFFSET = 4000  # the authors' img2img seeds were 4000 + i


def img2img_schedule(steps: int, strength: float) -> int:
    """The nominal steps img2img is called with: diffusers runs int(n * strength) of them, and at least
    one has to run, so a small strength stretches the schedule (callers bound it by max_steps)."""
    if int(steps * strength) >= 1:
        return steps
    n = math.ceil(1 / strength)
    return n if int(n * strength) >= 1 else n + 1


@dataclass(frozen=True)
class WorkItem:
    """One image to make, what the batcher collects across requests: text2img then img2img, or with
    ``image`` (RGB, ``size`` x ``size``) img2img of that image alone, seeded with ``seed``."""

    label: str
    seed: int
    steps: int
    guidance: float
    strength: float
    size: int
    image: Image.Image | None = field(default=None, compare=False)

    @property
    def refine_seed(self) -> int:
        return self.seed if self.image is not None else self.seed + REFINE_SEED_OFFSET

    def group(self) -> tuple[bool, int, float, float, int]:
        return (self.image is not None, self.steps, self.guidance, self.strength, self.size)


@dataclass
class WorkResult:
    text2img: Image.Image | None  # None for an uploaded image
    refined: Image.Image
    metadata: dict[str, Any] = field(default_factory=dict)


def _generator(seed: int) -> torch.Generator:
    # CPU generators: the same seed gives the same starting noise on any device and in any batch.
    return torch.Generator("cpu").manual_seed(seed)


class HybridModel:
    def __init__(self, model: ModelConfig, serve: ServeConfig) -> None:
        self.model_cfg, self.cfg = model, serve
        self._lock = threading.Lock()
        self.device = resolve_device(model.device)
        self.txt, self.img = load_pipelines(model, self.device)
        set_scheduler(self.txt, serve.scheduler)
        self.img.scheduler = self.txt.scheduler
        self.base_model = model_id(model)
        self.adapter: dict[str, Any] | None = None
        if serve.adapters:
            self.adapter = load_adapters(self.txt, serve.adapters, base_model=self.base_model)
        self.adapter_hash = adapter_hash(self.adapter)
        self.tokens = adapter_class_tokens(self.adapter, CLASSES, DEFAULT_TOKEN)

    def prompt(self, label: str) -> str:
        return render_prompt(label, self.tokens[label])

    def describe(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "preset": self.model_cfg.preset,
            "scheduler": self.cfg.scheduler,
            "adapters": self.adapter,
            "tokens": (self.adapter or {}).get("tokens") or [],
            "class_tokens": self.tokens,
            "prompts": {c: self.prompt(c) for c in CLASSES},
        }

    def _metadata(self, item: WorkItem, t2i_s: float, refine_s: float) -> dict[str, Any]:
        return {
            "class": item.label,
            "prompt": self.prompt(item.label),
            "negative_prompt": self.cfg.negative_prompt,
            "seed": item.seed,
            "refine_seed": item.refine_seed,
            "scheduler": self.cfg.scheduler,
            "steps": item.steps,
            "guidance": item.guidance,
            "strength": item.strength,
            "size": item.size,
            "base_model": self.base_model,
            "adapter_hash": self.adapter_hash,
            "text2img_seconds": round(t2i_s, 4),
            "img2img_seconds": round(refine_s, 4),
        }

    @torch.inference_mode()
    def run(self, items: list[WorkItem]) -> list[WorkResult]:
        """``items`` in order; one text2img and one img2img call per group of equal settings."""
        results: dict[int, WorkResult] = {}
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.group(), []).append(i)
        with self._lock:
            for (uploaded, steps, guidance, strength, _), idx in groups.items():
                batch = [items[i] for i in idx]
                prompts = [self.prompt(it.label) for it in batch]
                t0 = time.perf_counter()
                t2i = [it.image for it in batch] if uploaded else self._text2img(batch, prompts)
                t1 = time.perf_counter()
                refined = self.refine_images(
                    t2i, prompts, strength, steps, guidance, [it.refine_seed for it in batch]
                )
                t2 = time.perf_counter()
                per = len(batch)
                for i, it, a, b in zip(idx, batch, t2i, refined, strict=True):
                    meta = self._metadata(it, (t1 - t0) / per, (t2 - t1) / per)
                    results[i] = WorkResult(None if uploaded else a, b, meta)
        return [results[i] for i in range(len(items))]

    def _text2img(self, batch: list[WorkItem], prompts: list[str]) -> list[Image.Image]:
        first = batch[0]  # the batch shares its settings
        return self.txt(
            prompt=prompts,
            negative_prompt=[self.cfg.negative_prompt] * len(batch),
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            height=first.size,
            width=first.size,
            generator=[_generator(it.seed) for it in batch],
            output_type="pil",
        ).images

    @torch.inference_mode()
    def refine_images(
        self,
        images: list[Image.Image],
        prompts: list[str],
        strength: float,
        steps: int,
        guidance: float,
        seeds: list[int],
    ) -> list[Image.Image]:
        """img2img over ``images``: int(steps * strength) steps, at least 1 (see img2img_schedule)."""
        return self.img(
            prompt=prompts,
            image=images,
            strength=strength,
            num_inference_steps=img2img_schedule(steps, strength),
            guidance_scale=guidance,
            negative_prompt=[self.cfg.negative_prompt] * len(images),
            generator=[_generator(s) for s in seeds],
            output_type="pil",
        ).images

    def probe(self) -> None:
        """A cheap forward pass through the text encoder: raises when the model cannot run."""
        ids = self.txt.tokenizer(
            ["probe"], padding="max_length", max_length=8, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        with torch.inference_mode():
            out = self.txt.text_encoder(ids)[0]
        if not torch.isfinite(out).all():
            raise RuntimeError("text encoder produced non-finite values")

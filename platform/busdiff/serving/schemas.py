"""Request and response models of the HTTP API (FastAPI builds the OpenAPI spec from them).

Limits come from the serve config, so the models are made per config by :func:`request_models`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from busdiff.config import CLASSES, ServeConfig

ClassName = Literal["benign", "malignant", "normal"]
assert set(CLASSES) == {"benign", "malignant", "normal"}


class _GenerateBase(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("size", check_fields=False)
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"size must be a multiple of 8, got {v}")
        return v


def generate_request_model(cfg: ServeConfig) -> type[BaseModel]:
    """``POST /v1/generate`` body, bounded by the config's limits."""
    return create_model(
        "GenerateRequest",
        __base__=_GenerateBase,
        label=(ClassName, Field(alias="class", description="lesion class to generate")),
        n=(int, Field(1, ge=1, le=cfg.max_n, description="number of images (seeds seed .. seed+n-1)")),
        seed=(int, Field(0, ge=0, le=2**31 - 1)),
        steps=(int, Field(cfg.default_steps, ge=1, le=cfg.max_steps, description="text2img steps")),
        guidance=(float, Field(cfg.default_guidance, ge=0, le=cfg.max_guidance)),
        strength=(float, Field(cfg.default_strength, gt=0, le=1, description="img2img refinement strength")),
        size=(int, Field(cfg.default_size, ge=cfg.min_size, le=cfg.max_size, description="multiple of 8")),
        format=(Literal["png", "json"], Field("png", description="png: one image (n=1); json: base64 PNGs")),
        include_text2img=(bool, Field(False, description="json: also return the unrefined text2img image")),
    )


class ImageOut(BaseModel):
    id: str
    png: str = Field(description="base64 PNG of the refined image")
    text2img_png: str | None = Field(None, description="base64 PNG before refinement (include_text2img)")
    metadata: dict


class GenerateResponse(BaseModel):
    images: list[ImageOut]


class ModelsResponse(BaseModel):
    base_model: str
    preset: str
    scheduler: str
    adapters: dict | None
    tokens: list[str]
    classes: list[str]
    prompts: dict[str, str]
    limits: dict


class ErrorResponse(BaseModel):
    error: str
    field: str | None = None

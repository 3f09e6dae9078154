"""Request and response models of the HTTP API (FastAPI builds the OpenAPI spec from them).

Limits come from the serve config, so the request models are made per config by :func:`request_models`.
Each bounds the real work of a request: steps, the img2img schedule a strength needs, n x size²."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from busdiff.config import CLASSES, ServeConfig
from busdiff.serving.model import img2img_schedule

ClassName = Literal["benign", "malignant", "normal"]
assert set(CLASSES) == {"benign", "malignant", "normal"}


def request_models(cfg: ServeConfig) -> tuple[type[BaseModel], type[BaseModel]]:
    """(``POST /v1/generate`` JSON body, ``POST /v1/refine`` form fields), bounded by ``cfg``'s limits."""

    class Work(BaseModel):
        # Field order matters: a validator sees the fields declared before its own (info.data).
        seed: int = Field(0, ge=0, le=2**31 - 1)
        steps: int = Field(cfg.default_steps, ge=1, le=cfg.max_steps, description="text2img steps")
        guidance: float = Field(cfg.default_guidance, ge=0, le=cfg.max_guidance)
        strength: float = Field(cfg.default_strength, gt=0, le=1, description="img2img refinement strength")
        size: int = Field(cfg.default_size, ge=cfg.min_size, le=cfg.max_size, description="multiple of 8")

        @field_validator("strength")
        @classmethod
        def _bounded_schedule(cls, v: float, info: ValidationInfo) -> float:
            steps = info.data.get("steps")
            # v * max_steps < 1 first: 1 / v overflows for the tiniest floats
            if steps is not None and (v * cfg.max_steps < 1 or img2img_schedule(steps, v) > cfg.max_steps):
                raise ValueError(
                    f"strength {v} with steps {steps} needs an img2img schedule longer than max_steps "
                    f"{cfg.max_steps} to run one step: raise strength or steps"
                )
            return v

        @field_validator("size")
        @classmethod
        def _multiple_of_8(cls, v: int) -> int:
            if v % 8:
                raise ValueError(f"size must be a multiple of 8, got {v}")
            return v

    class GenerateRequest(Work):
        # Strict: JSON has numbers and booleans, so "8" or true is no number and 1 no boolean.
        model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)
        label: ClassName = Field(alias="class", description="lesion class to generate")
        n: int = Field(1, ge=1, le=cfg.max_n, description="number of images (seeds seed .. seed+n-1)")
        format: Literal["png", "json"] = Field("png", description="png: one image (n=1); json: base64 PNGs")
        include_text2img: bool = Field(False, description="json: also return the unrefined text2img image")

        @field_validator("n")
        @classmethod
        def _bounded_pixels(cls, v: int, info: ValidationInfo) -> int:
            size = info.data.get("size")
            if size is not None and v * size * size > cfg.max_request_pixels:
                raise ValueError(
                    f"n={v} images of {size}x{size} are {v * size * size} pixels, over the limit of "
                    f"{cfg.max_request_pixels} (max_request_pixels)"
                )
            return v

        @field_validator("format")
        @classmethod
        def _one_png(cls, v: str, info: ValidationInfo) -> str:
            if v == "png" and info.data.get("n", 1) != 1:
                raise ValueError("format png returns one image: use n=1, or format json")
            return v

    class RefineForm(Work):
        # Form fields arrive as text, so they are parsed (lax), not strict.
        model_config = ConfigDict(populate_by_name=True)
        label: ClassName = Field("benign", alias="class", description="lesion class of the upload")

    return GenerateRequest, RefineForm


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
    field: str | None = Field(None, description="what is wrong: a request field, body, image, path, ...")

"""Generation stages in bfloat16 on the CPU (tiny preset, no Ray): the half-precision path GPUs take.

``resolve_dtype`` maps half dtypes to float32 on a CPU on purpose (test_presets asserts it), so a CPU run
with ``model.dtype: bfloat16`` alone would test float32 again; here that fallback is switched off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busdiff.config import ModelConfig
from busdiff.generate import stages
from busdiff.generate.stages import Img2Img, Text2Img
from busdiff.models import presets

MODEL = ModelConfig(preset="tiny", device="cpu", dtype="bfloat16").model_dump()


@pytest.fixture(autouse=True)
def bf16_on_cpu(monkeypatch, one_torch_thread):
    monkeypatch.setattr(presets, "resolve_dtype", lambda dtype, device: presets._DTYPES[dtype])


def test_text2img_and_img2img_in_bf16_give_finite_images(monkeypatch):
    floats: list[np.ndarray] = []  # the images as the pipelines return them, before the cast to uint8
    to_uint8 = stages._to_uint8
    monkeypatch.setattr(stages, "_to_uint8", lambda images: to_uint8(floats.append(images) or images))
    batch = {
        "id": np.array(["a", "b"]),
        "label": np.array(["benign", "malignant"]),
        "prompt": np.array(["an ultrasound image of a benign breast lesion"] * 2),
        "seed": np.arange(2),
        "refine_seed": 100 + np.arange(2),
    }
    t2i = Text2Img(MODEL, steps=3, guidance=7.5, size=32, output="both")
    assert t2i.pipe.unet.dtype == t2i.pipe.vae.dtype == t2i.pipe.text_encoder.dtype == torch.bfloat16
    out = t2i(batch)
    assert out["latent"].dtype == np.float32 and np.isfinite(out["latent"]).all()
    refined = Img2Img(MODEL, steps=3, guidance=7.5, strength=0.5)(out)
    assert out["t2i"].shape == refined["refined"].shape == (2, 32, 32, 3)
    assert len(floats) == 2 and all(np.isfinite(f).all() and f.std() > 0 for f in floats)

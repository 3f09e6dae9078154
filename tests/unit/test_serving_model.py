"""The model a Serve replica holds, without Serve: batching by settings, seeds, health probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busdiff.config import ModelConfig, ServeConfig
from busdiff.serving.model import HybridModel, WorkItem


@pytest.fixture(scope="module")
def model() -> HybridModel:
    return HybridModel(ModelConfig(preset="tiny"), ServeConfig(default_size=64, min_size=32))


def _arr(img) -> np.ndarray:
    return np.asarray(img).astype(int)


def test_mixed_batch_keeps_order_sizes_and_per_seed_images(model):
    items = [
        WorkItem("benign", 1, 2, 7.5, 0.5, 32),
        WorkItem("normal", 2, 3, 5.0, 0.5, 64),
        WorkItem("malignant", 3, 2, 7.5, 0.5, 32),
    ]
    out = model.run(items)
    assert [r.metadata["seed"] for r in out] == [1, 2, 3]
    assert [r.refined.size for r in out] == [(32, 32), (64, 64), (32, 32)]
    alone = model.run([items[2]])[0]
    np.testing.assert_allclose(_arr(alone.refined), _arr(out[2].refined), atol=2)
    other_seed = model.run([WorkItem("malignant", 4, 2, 7.5, 0.5, 32)])[0]
    assert np.abs(_arr(other_seed.refined) - _arr(alone.refined)).mean() > 1


def test_refine_runs_at_least_one_step_for_small_strength(model):
    from PIL import Image

    img = Image.new("RGB", (32, 32), (90, 90, 90))
    out = model.refine_images([img], [model.prompt("benign")], strength=0.1, steps=2, guidance=1.0, seeds=[0])
    assert out[0].size == (32, 32)
    assert np.abs(_arr(out[0]) - 90).mean() > 0.5, "no denoising step ran"


def test_probe_fails_when_the_model_cannot_run():
    broken = HybridModel(ModelConfig(preset="tiny"), ServeConfig())
    broken.probe()
    with torch.no_grad():
        broken.txt.text_encoder.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        broken.probe()

"""The model a Serve replica holds, without Serve: batching by settings, seeds, health probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busdiff.config import ModelConfig, ServeConfig
from busdiff.serving.model import HybridModel, WorkItem, img2img_schedule


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


def test_concurrent_runs_each_get_their_own_pipeline_call(model):
    """Two threads running different settings at once (as a batch beside a refine did) give exactly
    the images each gives alone: pipeline calls do not interleave on the shared scheduler."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    upload = Image.new("RGB", (32, 32), (90, 90, 90))
    jobs = [
        [WorkItem("benign", 1, 3, 7.5, 0.5, 32), WorkItem("normal", 2, 3, 7.5, 0.5, 32)],
        [WorkItem("malignant", 5, 4, 3.0, 0.6, 32, image=upload)],
        [WorkItem("normal", 9, 2, 1.0, 0.5, 64)],
    ] * 3
    alone = [[_arr(r.refined) for r in model.run(job)] for job in jobs[:3]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(model.run, jobs))
    for k, results in enumerate(together):
        for got, want in zip(results, alone[k % 3], strict=True):
            np.testing.assert_array_equal(_arr(got.refined), want)


def test_uploaded_image_is_refined_alone_with_its_own_seed(model):
    from PIL import Image

    upload = Image.new("RGB", (32, 32), (90, 90, 90))
    (res,) = model.run([WorkItem("benign", 3, 2, 1.0, 0.5, 32, image=upload)])
    assert res.text2img is None and res.metadata["refine_seed"] == 3
    assert res.refined.size == (32, 32)
    direct = model.refine_images([upload], [model.prompt("benign")], 0.5, 2, 1.0, [3])[0]
    np.testing.assert_array_equal(_arr(res.refined), _arr(direct))


@pytest.mark.parametrize(
    ("steps", "strength", "runs"), [(10, 0.3, 3), (2, 0.1, 1), (1, 0.2, 1), (4, 1e-3, 1)]
)
def test_img2img_schedule_runs_at_least_one_step(steps, strength, runs):
    n = img2img_schedule(steps, strength)
    assert n >= steps and int(n * strength) == runs

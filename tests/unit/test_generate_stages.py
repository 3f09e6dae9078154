"""Text2Img / Img2Img stages on the CPU with the tiny preset (no Ray): what Ray Data actors and Serve run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busdiff.config import SCHEDULERS, ModelConfig
from busdiff.generate.stages import Img2Img, Text2Img, load_stage_pipeline, read_source_images
from busdiff.models.adapters import AdapterError, add_lora, add_ti_tokens, save_adapters
from busdiff.models.presets import build_components

MODEL = ModelConfig(preset="tiny", device="cpu").model_dump()
SIZE = 32


def _batch(n: int = 3, offset: int = 0) -> dict[str, np.ndarray]:
    labels = np.array(["benign", "malignant", "normal"] * 2)[offset : offset + n]
    return {
        "id": np.array([f"x-{i}" for i in range(offset, offset + n)]),
        "label": labels,
        "prompt": np.array([f"an ultrasound image of a {c} breast lesion" for c in labels]),
        "negative_prompt": np.array([""] * n),
        "seed": np.arange(offset, offset + n),
        "refine_seed": 4000 + np.arange(offset, offset + n),
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs on one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="module")
def stages(one_thread):
    return (
        Text2Img(MODEL, steps=4, guidance=7.5, size=SIZE),
        Img2Img(MODEL, steps=4, guidance=7.5, strength=0.5),
    )


def test_images_do_not_depend_on_the_batch_they_land_in(stages):
    t2i, i2i = stages
    whole = i2i(t2i(_batch(3)))
    parts = [i2i(t2i(_batch(1, k))) for k in range(3)]
    assert whole["t2i"].shape == (3, SIZE, SIZE, 3) and whole["t2i"].dtype == np.uint8
    for k, part in enumerate(parts):
        np.testing.assert_allclose(whole["t2i"][k].astype(int), part["t2i"][0].astype(int), atol=2)
        np.testing.assert_allclose(whole["refined"][k].astype(int), part["refined"][0].astype(int), atol=2)
    assert np.abs(whole["t2i"].astype(int) - whole["refined"].astype(int)).mean() > 1, (
        "img2img changed nothing"
    )
    assert (whole["t2i_s"] > 0).all() and (whole["img2img_t1"] >= whole["img2img_t0"]).all()


def test_each_distinct_prompt_is_encoded_once_and_images_match_diffusers_per_row(stages):
    t2i, i2i = stages
    b = _batch(6)  # 6 rows, 3 prompts
    b["negative_prompt"] = np.array(["blurry", "", "blurry"] * 2)
    rows_encoded: dict[str, list[int]] = {"t2i": [], "i2i": []}
    hooks = [
        stage.pipe.text_encoder.register_forward_hook(
            lambda m, args, out, k=k: rows_encoded[k].append(len(args[0]))
        )
        for k, stage in (("t2i", t2i), ("i2i", i2i))
    ]
    try:
        out = t2i(b)
        refined = i2i(out)
    finally:
        for h in hooks:
            h.remove()
    # each stage encodes the 3 distinct (prompt, negative prompt) pairs once: prompts, then negatives
    assert rows_encoded == {"t2i": [3, 3], "i2i": [3, 3]}
    g = [torch.Generator("cpu").manual_seed(int(s)) for s in b["seed"]]
    ref = t2i.pipe(prompt=list(b["prompt"]), negative_prompt=list(b["negative_prompt"]),
                   num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE, generator=g,
                   output_type="np").images
    np.testing.assert_array_equal(out["t2i"], (np.clip(ref, 0, 1) * 255).round().astype(np.uint8))
    assert refined["refined"].shape == out["t2i"].shape


def test_latent_handoff_skips_the_decode_encode_round_trip(stages):
    t2i, i2i = stages
    latent = Text2Img(MODEL, steps=4, guidance=7.5, size=SIZE, output="latent")(_batch(2))
    assert latent["latent"].shape == (2, 4, SIZE // 8, SIZE // 8) and "t2i" not in latent
    refined = i2i(latent)
    assert refined["refined"].shape == (2, SIZE, SIZE, 3) and "latent" not in refined
    # "both" decodes the same latents for keeping: the same pixels as the pipeline's own decode
    both = Text2Img(MODEL, steps=4, guidance=7.5, size=SIZE, output="both")(_batch(2))
    np.testing.assert_allclose(both["t2i"].astype(int), t2i(_batch(2))["t2i"].astype(int), atol=1)
    np.testing.assert_allclose(both["latent"], latent["latent"], atol=1e-5)
    # the image hand-off encodes (and samples) the decoded image again: a different refined picture
    via_image = i2i(t2i(_batch(2)))["refined"].astype(int)
    assert np.abs(via_image - refined["refined"].astype(int)).mean() > 0.5


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs_text2img_and_img2img(name):
    pipe = load_stage_pipeline(MODEL, "text2img", scheduler=name)
    assert type(pipe.scheduler).__name__ == SCHEDULERS[name]
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # same noise schedule, other sampler
    t2i = Text2Img(MODEL, steps=4, guidance=7.5, size=SIZE, scheduler=name)(_batch(1))
    out = Img2Img(MODEL, steps=4, guidance=7.5, strength=0.5, scheduler=name)(t2i)
    assert out["refined"].shape == (1, SIZE, SIZE, 3)


def test_adapters_load_into_both_stages_and_another_base_is_refused(tmp_path, stages):
    comps = build_components("tiny", seed=0)
    add_lora(comps["unet"], rank=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in comps["unet"].named_parameters():
            if "lora_B" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    add_ti_tokens(comps["tokenizer"], comps["text_encoder"], ["<bus>"], "ultrasound")
    save_adapters(
        tmp_path / "a",
        comps,
        lora_unet=True,
        ti_tokens=["<bus>"],
        base_model="tiny",
        trained_ids=["benign_0001"],
    )
    batch = {**_batch(1), "prompt": np.array(["an <bus> image of a benign breast lesion"])}
    adapted = Text2Img(MODEL, steps=4, guidance=7.5, size=SIZE, adapters=str(tmp_path / "a"))(batch)
    plain = stages[0](_batch(1))
    assert np.abs(adapted["t2i"].astype(int) - plain["t2i"].astype(int)).mean() > 1
    refined = Img2Img(MODEL, steps=4, guidance=7.5, strength=0.5, adapters=str(tmp_path / "a"))(adapted)
    assert refined["refined"].shape == (1, SIZE, SIZE, 3)
    with pytest.raises(AdapterError, match="'tiny'.*'sd15-shape'"):
        load_stage_pipeline(
            ModelConfig(preset="sd15-shape", device="cpu"), "text2img", adapters=str(tmp_path / "a")
        )


def test_real_images_are_read_and_resized_for_refinement(tmp_path):
    from PIL import Image

    paths = []
    for k, size in enumerate([(50, 40), (80, 80)]):
        paths.append(tmp_path / f"{k}.png")
        Image.new("L", size, 100 + k).save(paths[-1])
    out = read_source_images({"id": np.array(["a", "b"]), "source": np.array([str(p) for p in paths])}, 32)
    assert out["t2i"].shape == (2, 32, 32, 3) and out["t2i"][1].min() == 101

"""`ray job submit` of jobs/finetune.py against a real head: plain diffusers loads the adapters it writes."""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from busdiff.data.phantom import write_phantom
from busdiff.generate.prompts import render_prompt
from busdiff.models.presets import build_components


def _image(pipe, prompt: str) -> np.ndarray:
    g = torch.Generator("cpu").manual_seed(3)
    return pipe(prompt, num_inference_steps=4, height=32, width=32, generator=g, output_type="np").images[0]


def test_finetune_job_writes_adapters_plain_diffusers_loads(ray_head, tmp_path):
    root, out = tmp_path / "busi", tmp_path / "run"
    write_phantom(root, 3, seed=11, size=64)

    r = ray_head.submit(
        "python",
        "jobs/finetune.py",
        "jobs/configs/finetune-tiny.yaml",
        "--set",
        f"data.root={root}",
        "--set",
        f"finetune.out={out}",
        "--set",
        "finetune.lora.steps=6",
        "--set",
        "finetune.ti.steps=4",
        "--set",
        "finetune.checkpoint_every=5",
        "--set",
        "finetune.validation.every=0",
        "--set",
        "finetune.log_every=5",
    )

    text = r.stdout + r.stderr
    assert "connected to Ray: 2 CPUs" in text and "succeeded" in text.lower()
    # a successful run prints no traceback (Ray Train's PlacementGroupCleaner finds its own cluster) and
    # not Ray's false alarm about the PreemptionWatcher's constructor arguments (issue 10, item 9)
    assert "Traceback" not in text and "max_restarts > 0" not in text
    assert "finetune: step 10/10 [ti 4/4]" in text  # the progress line reaches the job's log
    meta = json.loads((out / "adapters" / "adapter.json").read_text())
    assert meta["base_model"] == "tiny" and meta["tokens"] == ["<bus>"] and len(meta["trained_ids"]) == 6

    prompt = render_prompt("malignant", "<bus>")
    pipe = StableDiffusionPipeline(**build_components("tiny"), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base = _image(pipe, render_prompt("malignant"))
    pipe.load_lora_weights(str(out / "adapters"))
    pipe.load_textual_inversion(str(out / "adapters" / "learned_embeds.safetensors"))
    assert (
        pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(prompt, add_special_tokens=False).input_ids)[1]
        == "<bus>"
    )
    adapted = _image(pipe, prompt)
    assert np.isfinite(adapted).all() and np.abs(adapted - base).max() > 1e-3

"""Fine-tune -> generate -> serve against an SD-1.5-layout diffusers folder with CLIP's real vocabulary
(``model.preset: pretrained``, tests/sd15_folder.py), on the shared local Ray cluster: the adapters that
fine-tuning writes for a local base folder load into generation and serving, and the textual-inversion
token starts from CLIP's real ``ultrasound</w>`` row."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import load_file

from busdiff.config import CLASSES, load_config
from busdiff.data.phantom import write_phantom
from busdiff.finetune.trainer import FinetuneResult, run_finetune
from busdiff.generate.pipeline import run_generate
from busdiff.generate.sink import SAMPLES
from busdiff.models.adapters import LORA_FILE, TI_FILE, read_adapter_json
from tests.e2e.harness import free_port
from tests.ray.test_generate_pipeline import BASE, _sets
from tests.ray.test_serve import SMALL
from tests.sd15_folder import VOCAB_SIZE, sd15_folder

TOKEN = "<bus>"
LORA_STEPS, TI_STEPS = 3, 3


@pytest.fixture(scope="session")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sd15_folder(tmp_path_factory)


def _model(base: Path) -> list[str]:
    return ["model.preset=pretrained", f"model.base={base}", "model.device=cpu"]


@pytest.fixture(scope="module")
def finetuned(sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> FinetuneResult:
    tmp = tmp_path_factory.mktemp("sd15-chain")
    write_phantom(tmp / "busi", 3, seed=11, size=64)  # 2 train images per class
    cfg = load_config(None, [
        f"data.root={tmp / 'busi'}",
        *_model(sd15),
        f"finetune.out={tmp / 'finetune'}",
        "finetune.method=lora-then-ti",
        f"finetune.ti.token={TOKEN}",
        "finetune.ti.initializer_token=ultrasound",
        f"finetune.lora.steps={LORA_STEPS}",
        "finetune.lora.batch_size=1",
        "finetune.lora.lr=1e-2",
        f"finetune.ti.steps={TI_STEPS}",
        "finetune.ti.grad_accum=1",
        "finetune.ti.lr=1e-3",
        "finetune.resolution=32",
        "finetune.mixed_precision=no",
        "finetune.checkpoint_every=0",
        "finetune.log_every=1",
        "finetune.validation.every=0",
        "finetune.validation.n_per_class=1",
        "finetune.validation.steps=2",
        "finetune.scaling.num_workers=1",
    ])
    return run_finetune(cfg)


def test_finetune_trains_lora_then_a_token_started_from_clips_ultrasound(finetuned, sd15):
    from transformers import CLIPTextModel, CLIPTokenizer

    meta = read_adapter_json(finetuned.adapter_dir)
    assert meta["base_model"] == str(sd15) and meta["tokens"] == [TOKEN]
    assert meta["extra"]["method"] == "lora-then-ti" and finetuned.steps == LORA_STEPS + TI_STEPS
    assert TOKEN in meta["extra"]["captions"]["malignant"]
    lora = load_file(str(Path(finetuned.adapter_dir) / LORA_FILE))
    ups = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(v.abs().max() > 0 for v in ups)  # B starts at zero: the LoRA phase trained

    learned = load_file(str(Path(finetuned.adapter_dir) / TI_FILE))[TOKEN]
    assert learned.shape == (1, 32)
    tok = CLIPTokenizer.from_pretrained(str(sd15), subfolder="tokenizer", local_files_only=True)
    init_id = tok.convert_tokens_to_ids("ultrasound</w>")
    rows = CLIPTextModel.from_pretrained(str(sd15), subfolder="text_encoder").get_input_embeddings().weight
    assert rows.shape[0] == VOCAB_SIZE
    rows = rows.detach()
    # Few TI steps at a small lr: the vector moved, but stays nearest the row it started from.
    assert not torch.equal(learned[0], rows[init_id]), "the TI phase did not train the token"
    nearest = torch.cdist(learned, rows).argmin().item()
    assert nearest == init_id, f"nearest base token is {tok.convert_ids_to_tokens(nearest)!r}, not ultrasound"


def test_generate_with_the_adapters_makes_every_class(finetuned, sd15, tmp_path):
    out = tmp_path / "gen"
    cfg = load_config(None, [
        *_sets(BASE), *_model(sd15), f"generate.out={out}", f"generate.adapters={finetuned.adapter_dir}",
        "generate.count=2", "generate.steps=2", "generate.refine_steps=2",
    ])
    res = run_generate(cfg)
    assert (res.written, res.planned) == (6, 6)
    meta = pq.read_table(out / SAMPLES / "metadata.parquet").to_pylist()
    assert sorted(r["class"] for r in meta) == sorted(CLASSES * 2)
    for r in meta:
        assert TOKEN in r["prompt"] and r["class"] in r["prompt"], r["prompt"]
        assert r["base_model"] == str(sd15) and r["adapter_hash"]
        with Image.open(out / SAMPLES / r["file_name"]) as im:
            assert im.size == (32, 32)
            assert np.asarray(im.convert("L")).std() > 0  # an image, not a constant fill


@pytest.fixture(scope="module")
def served(finetuned, sd15):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = load_config(None, [*SMALL, *_model(sd15), f"serve.adapters={finetuned.adapter_dir}"])
    from busdiff.serving.app import build_app

    serve.run(build_app(cfg), name="sd15", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_serve_with_the_adapters_answers_every_class(served, sd15):
    models = requests.get(f"{served}/v1/models", timeout=30).json()
    assert models["base_model"] == str(sd15) and models["preset"] == "pretrained"
    assert models["tokens"] == [TOKEN]
    for label in CLASSES:
        assert TOKEN in models["prompts"][label] and label in models["prompts"][label]
        r = requests.post(f"{served}/v1/generate", json={"class": label, "seed": 1}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert r.headers["X-Busdiff-Base-Model"] == str(sd15)
        assert np.asarray(Image.open(io.BytesIO(r.content))).shape == (32, 32, 3)

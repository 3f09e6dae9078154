"""Adapters: busdiff writes LoRA + TI that plain diffusers loads, and checks what it reads (CPU, seconds)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from busdiff.config import ModelConfig
from busdiff.generate.prompts import render_prompt
from busdiff.models import adapters
from busdiff.models.adapters import (
    AdapterError,
    add_lora,
    add_ti_tokens,
    load_adapters,
    read_adapter_json,
    save_adapters,
)
from busdiff.models.presets import build_components, load_pipelines

TOKEN = "<bus>"
PROMPT = render_prompt("benign", token=TOKEN)


def _plain_pipe(seed: int = 0) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**build_components("tiny", seed=seed), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt: str = PROMPT) -> np.ndarray:
    g = torch.Generator("cpu").manual_seed(7)
    return pipe(prompt, num_inference_steps=4, height=64, width=64, generator=g, output_type="np").images


def _train(pipe, *, lora: bool = True, ti: bool = True, rank: int = 4, alpha: float = 8.0) -> None:
    """Stand-in for training: LoRA B (zero-initialised by peft) and the TI rows get random values."""
    g = torch.Generator("cpu").manual_seed(11)
    with torch.no_grad():
        if lora:
            add_lora(pipe.unet, rank=rank, alpha=alpha)
            for name, p in pipe.unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if ti:
            new = add_ti_tokens(pipe.tokenizer, pipe.text_encoder, [TOKEN], "ultrasound", num_vectors=2)
            w = pipe.text_encoder.get_input_embeddings().weight
            ids = pipe.tokenizer.convert_tokens_to_ids(new)
            w[ids] += torch.randn(len(ids), w.shape[1], generator=g)


@pytest.fixture
def trained(tmp_path):
    pipe = _plain_pipe()
    _train(pipe)
    meta = save_adapters(tmp_path / "adapter", pipe, lora_unet=True, ti_tokens=[TOKEN], base_model="tiny",
                         trained_ids=["benign_0001", "malignant_0002"], extra={"steps": 3})
    return pipe, tmp_path / "adapter", meta


def test_plain_diffusers_loads_lora_and_ti_and_reproduces_the_trained_image(trained):
    pipe, adir, _ = trained
    expected = _image(pipe)
    fresh = _plain_pipe()
    before = _image(fresh)
    assert np.abs(before - expected).max() > 0.05  # the trained adapter changes the image
    fresh.load_lora_weights(str(adir))
    fresh.load_textual_inversion(str(adir / "learned_embeds.safetensors"))
    ids = fresh.tokenizer(TOKEN, add_special_tokens=False).input_ids
    assert fresh.tokenizer.convert_ids_to_tokens(ids) == [TOKEN]
    after = _image(fresh)
    np.testing.assert_allclose(after, expected, atol=1e-5)
    # diffusers' multi-vector convention: the prompt's <bus> becomes "<bus> <bus>_1"
    assert fresh.maybe_convert_prompt(PROMPT, fresh.tokenizer).count(TOKEN) == 2


def test_lora_alone_roundtrips_with_alpha_not_equal_rank(tmp_path):
    pipe = _plain_pipe()
    _train(pipe, ti=False, rank=2, alpha=6.0)  # scale 3: lost if alpha were not stored
    meta = save_adapters(tmp_path / "a", pipe, lora_unet=True, ti_tokens=None, base_model="tiny",
                         trained_ids=[])
    assert meta["rank"] == 2 and meta["lora"]["alpha"] == 6.0 and meta["tokens"] == []
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["adapter.json", "pytorch_lora_weights.safetensors"]
    with safe_open(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        lora_meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") for k in keys)
    assert lora_meta["unet.lora_alpha"] == 6.0 and lora_meta["unet.r"] == 2
    prompt = render_prompt("malignant")
    fresh = _plain_pipe()
    before = _image(fresh, prompt)
    fresh.load_lora_weights(str(tmp_path / "a"))
    after = _image(fresh, prompt)
    assert np.abs(before - after).max() > 0.05
    np.testing.assert_allclose(after, _image(pipe, prompt), atol=1e-5)


def test_load_adapters_reaches_the_shared_img2img_pipeline(trained):
    _, adir, _ = trained
    txt, img = load_pipelines(ModelConfig(preset="tiny", device="cpu"))
    start = _image(txt, render_prompt("normal"))
    kw = dict(image=list(start), strength=0.5, num_inference_steps=8, output_type="np")
    before = img(PROMPT, generator=torch.Generator().manual_seed(1), **kw).images
    meta = load_adapters(txt, adir, base_model="tiny")
    assert meta["tokens"] == [TOKEN]
    after = img(PROMPT, generator=torch.Generator().manual_seed(1), **kw).images
    assert np.abs(before - after).max() > 0.02


def test_base_model_mismatch_is_refused(trained):
    _, adir, _ = trained
    with pytest.raises(ValueError) as e:
        load_adapters(_plain_pipe(), adir, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert "'tiny'" in str(e.value) and "stable-diffusion-v1-5/stable-diffusion-v1-5" in str(e.value)


def test_adapter_json_records_hashes_and_provenance(trained):
    _, adir, meta = trained
    on_disk = json.loads((adir / "adapter.json").read_text())
    assert on_disk == meta == read_adapter_json(adir)
    assert set(meta["files"]) == {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors"}
    for name, info in meta["files"].items():
        data = (adir / name).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
    assert meta["base_model"] == "tiny" and meta["tokens"] == [TOKEN] and meta["rank"] == 4
    assert meta["trained_ids"] == ["benign_0001", "malignant_0002"] and meta["extra"] == {"steps": 3}
    assert meta["busdiff_version"] and meta["created"].endswith("+00:00")
    assert meta["textual_inversion"] == [
        {"token": TOKEN, "file": "learned_embeds.safetensors", "num_vectors": 2,
         "vector_tokens": [TOKEN, f"{TOKEN}_1"], "dim": 32}
    ]
    with safe_open(str(adir / "learned_embeds.safetensors"), "pt") as f:
        assert list(f.keys()) == [TOKEN] and f.get_tensor(TOKEN).shape == (2, 32)


def test_tampered_or_missing_files_are_named(trained):
    _, adir, _ = trained
    emb = adir / "learned_embeds.safetensors"
    good = emb.read_bytes()
    data = bytearray(good)
    data[-1] ^= 0x01
    emb.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="learned_embeds.safetensors.*sha256"):
        read_adapter_json(adir)
    with pytest.raises(AdapterError, match="learned_embeds.safetensors"):
        load_adapters(_plain_pipe(), adir)
    emb.write_bytes(good)
    read_adapter_json(adir)
    (adir / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(AdapterError, match="pytorch_lora_weights.safetensors.*missing"):
        read_adapter_json(adir)
    (adir / "adapter.json").unlink()
    with pytest.raises(AdapterError, match="adapter.json"):
        read_adapter_json(adir)


def test_add_ti_tokens_initialises_rows_and_rejects_bad_tokens():
    comps = build_components("tiny")
    tok, te = comps["tokenizer"], comps["text_encoder"]
    n0 = len(tok)
    new = add_ti_tokens(tok, te, ["<a>", "<b>"], "ultrasound", num_vectors=3)
    assert new == ["<a>", "<a>_1", "<a>_2", "<b>", "<b>_1", "<b>_2"]
    assert len(tok) == n0 + 6 and te.get_input_embeddings().weight.shape[0] == n0 + 6
    w = te.get_input_embeddings().weight
    init = w[tok.convert_tokens_to_ids("ultrasound</w>")]
    assert all(torch.equal(w[i], init) for i in tok.convert_tokens_to_ids(new))
    with pytest.raises(ValueError, match="'ultrasound</w>' already exists"):
        add_ti_tokens(tok, te, ["ultrasound</w>"], "ultrasound")
    with pytest.raises(ValueError, match="'<a>' already exists"):
        add_ti_tokens(tok, te, ["<a>"], "ultrasound")
    with pytest.raises(ValueError, match="'ultrasound' already exists"):  # a whole word: "ultrasound</w>"
        add_ti_tokens(tok, te, ["ultrasound"], "breast")
    with pytest.raises(ValueError, match="'breast lesion' is not a single token"):
        add_ti_tokens(tok, te, ["<c>"], "breast lesion")
    # added tokens match the raw text (before CLIP's lowercasing), so an upper-case placeholder works too
    (upper,) = add_ti_tokens(tok, te, ["<BUS>"], "ultrasound")
    assert tok("an <BUS> image", add_special_tokens=False).input_ids[1] == tok.convert_tokens_to_ids(upper)


def test_save_is_atomic_and_replaces_a_previous_adapter(trained, monkeypatch):
    pipe, adir, _ = trained

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapters, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapters(adir, pipe, lora_unet=True, ti_tokens=[TOKEN], base_model="tiny", trained_ids=["new"])
    assert read_adapter_json(adir)["trained_ids"] == ["benign_0001", "malignant_0002"]  # old one intact
    assert sorted(p.name for p in adir.parent.iterdir()) == ["adapter"]  # no temp dirs left
    monkeypatch.undo()
    meta = save_adapters(adir, pipe, lora_unet=False, ti_tokens=[TOKEN], base_model="tiny",
                         trained_ids=["new"])
    assert read_adapter_json(adir) == meta and meta["lora"] is None
    assert sorted(p.name for p in adir.iterdir()) == ["adapter.json", "learned_embeds.safetensors"]
    assert sorted(p.name for p in adir.parent.iterdir()) == ["adapter"]


def test_save_needs_something_to_save(tmp_path):
    pipe = _plain_pipe()
    with pytest.raises(ValueError, match="nothing to save"):
        save_adapters(tmp_path / "x", pipe, lora_unet=False, ti_tokens=[], base_model="tiny", trained_ids=[])
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_adapters(tmp_path / "x", pipe, lora_unet=True, ti_tokens=None, base_model="tiny", trained_ids=[])
    assert not (tmp_path / "x").exists()

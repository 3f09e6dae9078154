"""Model presets: tiny components, device/dtype, local and unreachable pretrained bases (CPU, seconds)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from busdiff.config import ModelConfig
from busdiff.generate.prompts import PROMPTS, render_prompt
from busdiff.models import presets
from busdiff.models.presets import (
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    ModelLoadError,
    build_components,
    build_tokenizer,
    load_pipelines,
    model_id,
    resolve_device,
    resolve_dtype,
)

CPU = torch.device("cpu")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _t2i(pipe, prompt: str = "an ultrasound image showing normal breast tissue", **kw) -> np.ndarray:
    args = dict(num_inference_steps=4, height=64, width=64, generator=_gen(0), output_type="np")
    return pipe(prompt, **{**args, **kw}).images


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    with pytest.raises(ModelLoadError, match="cuda"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_resolve_dtype_half_falls_back_on_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger=presets.__name__):
        assert resolve_dtype("float16", CPU) == torch.float32
        assert resolve_dtype("bfloat16", CPU) == torch.float32
    assert "float16" in caplog.text and "float32" in caplog.text
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16


def test_generated_tokenizer_has_whole_words_for_the_prompts():
    tok = build_tokenizer()
    assert tok.model_max_length == 77
    vocab = tok.get_vocab()
    assert vocab["<|endoftext|>"] == len(tok) - 1 and vocab["<|startoftext|>"] == len(tok) - 2
    for label in PROMPTS:
        prompt = render_prompt(label)
        ids = tok(prompt, add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids) == [w + "</w>" for w in prompt.split()], prompt
    assert len(tok("ultrasound", add_special_tokens=False).input_ids) == 1
    # any text encodes (byte-level alphabet), padded to 77 for the text encoder
    ids = tok("Ünknown wörds, 123 & symbols!", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and max(ids) < len(tok)
    # sd15-shape pads the vocabulary to SD 1.5's 49408 rows with <|endoftext|> = 49407
    big = build_tokenizer(49408)
    assert len(big) == 49408 and big.convert_tokens_to_ids("<|endoftext|>") == 49407
    text = render_prompt("normal")
    assert big.convert_ids_to_tokens(big(text).input_ids) == tok.convert_ids_to_tokens(tok(text).input_ids)
    assert big(text).input_ids[-1] == 49407


def test_tiny_is_deterministic_by_seed_and_sd_shaped():
    a, b, c = (build_components("tiny", seed=s) for s in (0, 0, 1))
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = _state(a[name]), _state(b[name]), _state(c[name])
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name
    unet, vae, te = a["unet"], a["vae"], a["text_encoder"]
    assert unet.config.cross_attention_dim == te.config.hidden_size
    assert unet.config.in_channels == vae.config.latent_channels == 4
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert te.config.vocab_size == len(a["tokenizer"]) and te.config.max_position_embeddings == 77
    sched = a["scheduler"]
    assert isinstance(sched, DPMSolverMultistepScheduler)
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000
    assert sched.config.beta_start == pytest.approx(0.00085) and sched.config.beta_end == pytest.approx(0.012)
    assert {"safety_checker", "feature_extractor", "image_encoder"} <= a.keys()
    with pytest.raises(ModelLoadError, match="pretrained"):
        build_components("pretrained")


def test_sd15_shape_configs_match_sd15_parameter_counts():
    # built on the meta device: shapes only, no memory, well under a second
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(te) == 123_060_480


def test_text2img_and_img2img_run_with_requested_sizes():
    txt, img = load_pipelines(ModelConfig(preset="tiny", device="cpu"))
    assert img.unet is txt.unet and img.text_encoder is txt.text_encoder and img.tokenizer is txt.tokenizer
    assert txt.device == CPU
    prompts = [render_prompt("benign"), render_prompt("malignant")]
    a = _t2i(txt, prompts, height=64, width=96, generator=[_gen(1), _gen(2)])
    assert a.shape == (2, 64, 96, 3) and np.isfinite(a).all()
    b = _t2i(txt, prompts, height=64, width=96, generator=[_gen(1), _gen(2)])
    np.testing.assert_array_equal(a, b)  # same seeds, same images
    assert not np.allclose(a[0], a[1])
    refined = img(prompts, image=list(a), strength=0.3, num_inference_steps=10, generator=[_gen(3), _gen(4)],
                  output_type="np").images
    assert refined.shape == (2, 64, 96, 3) and np.isfinite(refined).all()
    assert not np.allclose(refined, a)


def test_half_dtype_on_cpu_loads_float32():
    txt, _ = load_pipelines(ModelConfig(preset="tiny", device="cpu", dtype="float16"))
    assert txt.unet.dtype == txt.vae.dtype == txt.text_encoder.dtype == torch.float32


def test_pretrained_local_dir_gives_the_tiny_image(tmp_path):
    tiny_cfg = ModelConfig(preset="tiny", device="cpu", seed=3)
    txt, _ = load_pipelines(tiny_cfg)
    txt.save_pretrained(tmp_path / "sd")
    cfg = ModelConfig(preset="pretrained", base=str(tmp_path / "sd"), device="cpu")
    txt2, img2 = load_pipelines(cfg)
    assert isinstance(txt2.scheduler, DPMSolverMultistepScheduler)
    assert img2.unet is txt2.unet
    np.testing.assert_allclose(_t2i(txt2), _t2i(txt), atol=1e-6)
    other, _ = load_pipelines(ModelConfig(preset="tiny", device="cpu", seed=4))
    assert not np.allclose(_t2i(other), _t2i(txt), atol=1e-3)
    assert model_id(cfg) == str(tmp_path / "sd")
    assert model_id(tiny_cfg) == "tiny" and model_id(ModelConfig(preset="sd15-shape")) == "sd15-shape"


def test_pretrained_dir_without_model_index_is_named(tmp_path):
    (tmp_path / "notsd").mkdir()
    with pytest.raises(ModelLoadError) as e:
        load_pipelines(ModelConfig(preset="pretrained", base=str(tmp_path / "notsd"), device="cpu"))
    assert str(tmp_path / "notsd") in str(e.value) and "model_index.json" in str(e.value)


def test_unreachable_hub_id_says_how_to_point_at_a_directory(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    base = "busdiff-tests/no-such-model-anywhere"
    with pytest.raises(ModelLoadError) as e:
        load_pipelines(ModelConfig(preset="pretrained", base=base, device="cpu"))
    msg = str(e.value)
    assert base in msg
    assert "--set model.base=/path/to/stable-diffusion-v1-5" in msg
    assert "offline" in msg and "model_index.json" in msg
    assert isinstance(e.value, ValueError)

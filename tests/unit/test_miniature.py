"""The miniature base model: deterministic, cached by recipe, atomic, a diffusers folder that loads like
SD 1.5 and through ``preset: miniature`` (a few-step recipe at 32 px: about a second per pretraining)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from pydantic import ValidationError
from transformers import CLIPTextModel

from busdiff.config import MiniatureConfig, ModelConfig
from busdiff.generate.prompts import PROMPTS, render_prompt
from busdiff.models import miniature
from busdiff.models.adapters import add_ti_tokens
from busdiff.models.miniature import (
    cached_folder,
    miniature_id,
    pretrain_miniature,
    recipe_hash,
)
from busdiff.models.presets import load_pipelines, model_id, resolve_miniature

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEW_STEPS = dict(
    size=32, render_size=64, n_images=6, n_held_out=3, vae_steps=5, unet_steps=5, vae_batch_size=4,
    unet_batch_size=4, vae_crop=16, vae_blocks=[8, 16], unet_blocks=[16, 32], text_hidden=16, text_layers=1,
)
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")


def _cfg(cache, **kw) -> MiniatureConfig:
    return MiniatureConfig(**{**FEW_STEPS, "cache_dir": str(cache), **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return pretrain_miniature(_cfg(tmp_path_factory.mktemp("mini")), progress_every_s=0)


def test_folder_holds_a_complete_pipeline_with_recipe_and_metrics(folder):
    for name in ("model_index.json", "recipe.json", "metrics.json", *WEIGHTS, "tokenizer", "scheduler"):
        assert (folder / name).exists(), name
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"][1] == "DPMSolverMultistepScheduler"
    recipe = json.loads((folder / "recipe.json").read_text())
    assert folder.name == recipe["hash"] and recipe["id"] == f"busdiff-miniature-{folder.name}"
    assert recipe["recipe"]["caption"] == "an ultrasound image" and "cache_dir" not in recipe["recipe"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert np.isfinite(metrics["vae_psnr_held_out_db"]) and np.isfinite(metrics["unet_final_loss"])
    assert set(metrics["seconds"]) >= {"data", "vae", "unet", "total"}
    vae_cfg = json.loads((folder / "vae/config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(metrics["scaling_factor"]) != 1.0


def test_loads_with_from_pretrained_and_samples_finite_images(folder):
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and pipe.tokenizer.model_max_length == 77
    pipe.set_progress_bar_config(disable=True)
    out = pipe([render_prompt("malignant")] * 2, num_inference_steps=2, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 32, 32, 3)  # the default size is the recipe's
    assert np.isfinite(out).all()


def test_tokenizer_has_prompt_words_and_takes_placeholder_tokens(folder):
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    tok = pipe.tokenizer
    words = {w for t in PROMPTS.values() for w in t.replace("{token}", "ultrasound").split()}
    for w in words:
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w  # whole words, not byte pieces
    added = add_ti_tokens(tok, pipe.text_encoder, ["<bus-benign>"], "ultrasound")
    ids = tok(render_prompt("benign", "<bus-benign>"), return_tensors="pt").input_ids
    assert tok.convert_tokens_to_ids(added[0]) in ids[0].tolist()
    assert torch.isfinite(pipe.text_encoder(ids)[0]).all()


def test_same_seed_same_bytes_other_seed_differs(folder, tmp_path):
    torch.set_num_threads(2)  # the pretraining uses one thread whatever the caller set
    again = pretrain_miniature(_cfg(tmp_path / "a"), progress_every_s=0)
    other = pretrain_miniature(_cfg(tmp_path / "b", seed=1), progress_every_s=0)
    torch.set_num_threads(1)
    assert again.name == folder.name and other.name != folder.name
    for w in WEIGHTS:
        assert (again / w).read_bytes() == (folder / w).read_bytes(), w
    assert (other / WEIGHTS[0]).read_bytes() != (folder / WEIGHTS[0]).read_bytes()


def test_second_call_returns_the_cached_folder_without_training(folder, monkeypatch):
    cfg = _cfg(folder.parent)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    def no_training(*a, **k):
        raise AssertionError("a cached recipe was trained again")

    monkeypatch.setattr(miniature, "_pretrain_into", no_training)
    assert pretrain_miniature(cfg) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_failure_mid_pretraining_leaves_no_folder(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(miniature, "train_unet", boom)  # after the data and the VAE are done
    with pytest.raises(RuntimeError, match="killed"):
        pretrain_miniature(cfg, progress_every_s=0)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []
    assert not cached_folder(cfg).exists()


def test_temp_folder_of_a_killed_run_is_cleared_and_never_used(tmp_path):
    cfg = _cfg(tmp_path)
    stale = tmp_path / f".tmp-{recipe_hash(cfg)}-999999"
    (stale / "unet").mkdir(parents=True)
    folder = pretrain_miniature(cfg, progress_every_s=0)
    assert not stale.exists() and (folder / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [folder.name]


def test_recipe_hash_names_the_recipe_not_the_cache(tmp_path):
    a, b = _cfg(tmp_path / "x"), _cfg(tmp_path / "y")
    assert recipe_hash(a) == recipe_hash(b) and len(recipe_hash(a)) == 16
    assert recipe_hash(_cfg(tmp_path, unet_steps=6)) != recipe_hash(a)
    assert recipe_hash(_cfg(tmp_path, caption="a scan")) != recipe_hash(a)
    assert model_id(ModelConfig(preset="miniature", miniature=a)) == miniature_id(b)
    assert miniature_id(MiniatureConfig()) == f"busdiff-miniature-{recipe_hash(MiniatureConfig())}"


def test_config_refuses_shapes_the_vae_cannot_take():
    with pytest.raises(ValidationError, match="multiples of 4"):
        MiniatureConfig(size=62)
    with pytest.raises(ValidationError, match="vae_crop"):
        MiniatureConfig(size=32, vae_crop=48)
    with pytest.raises(ValidationError, match="render_size"):
        MiniatureConfig(size=128, render_size=64)


def test_preset_miniature_loads_the_cached_folder_like_pretrained(folder, monkeypatch):
    mcfg = ModelConfig(preset="miniature", miniature=_cfg(folder.parent), device="cpu")
    monkeypatch.setattr(miniature, "_pretrain_into", lambda *a, **k: pytest.fail("cached: no training"))
    resolved = resolve_miniature(mcfg)
    assert resolved.preset == "pretrained" and resolved.base == str(folder)
    txt, img = load_pipelines(mcfg)
    ref, _ = load_pipelines(ModelConfig(preset="pretrained", base=str(folder), device="cpu"))
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(txt, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), name
        assert getattr(img, name) is getattr(txt, name)  # one set of components
    assert txt.vae.config.scaling_factor == ref.vae.config.scaling_factor
    assert model_id(mcfg) == f"busdiff-miniature-{folder.name}"


def test_finetune_generate_and_serve_run_on_preset_miniature(folder, tmp_path, monkeypatch):
    from busdiff.config import ServeConfig, load_config
    from busdiff.data.phantom import write_phantom
    from busdiff.finetune.plain import local_rows, plain_train
    from busdiff.finetune.trainer import prepare
    from busdiff.generate.stages import Text2Img
    from busdiff.models.adapters import AdapterError, load_adapters
    from busdiff.serving.model import HybridModel

    monkeypatch.setattr(miniature, "_pretrain_into", lambda *a, **k: pytest.fail("cached: no training"))
    write_phantom(tmp_path / "busi", 2, seed=3, size=64)
    recipe = [f"model.miniature.{k}={json.dumps(v)}" for k, v in FEW_STEPS.items()]
    cfg = load_config(None, [
        f"data.root={tmp_path / 'busi'}", "model.preset=miniature", "model.device=cpu", *recipe,
        f"model.miniature.cache_dir={folder.parent}", f"finetune.out={tmp_path / 'ft'}",
        "finetune.resolution=32", "finetune.mixed_precision=no", "finetune.method=lora-then-ti",
        "finetune.lora.steps=2", "finetune.ti.steps=2", "finetune.lora.batch_size=2",
        "finetune.ti.batch_size=2", "finetune.ti.grad_accum=1",
    ])
    prepared = prepare(cfg)  # the driver's checks read the miniature's tokenizer from its folder
    run = plain_train(cfg, local_rows(cfg, prepared.records))
    assert all(np.isfinite(run.losses))
    adapter = tmp_path / "adapter"
    run.model.save_adapter(adapter, [r.id for r in prepared.records], {})
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["base_model"] == f"busdiff-miniature-{folder.name}"

    batch = {"id": np.array(["x-0"]), "label": np.array(["benign"]), "seed": np.array([0]),
             "prompt": np.array([render_prompt("benign", "<bus>")]), "negative_prompt": np.array([""]),
             "refine_seed": np.array([4000])}
    out = Text2Img(cfg.model, steps=2, guidance=3.0, size=32, adapters=str(adapter))(batch)
    assert out["t2i"].shape == (1, 32, 32, 3)
    with pytest.raises(AdapterError, match="busdiff-miniature"):
        load_adapters(Text2Img(cfg.model, steps=2, guidance=3.0, size=32).pipe, adapter, base_model="tiny")
    served = HybridModel(cfg.model, ServeConfig())
    assert served.base_model == f"busdiff-miniature-{folder.name}"

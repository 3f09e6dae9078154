"""The SD 1.5 folder fixture (tests/sd15_folder.py) against CLIP's own tokenizer, and busdiff's token checks
against CLIP's real vocabulary through ``model.preset: pretrained`` (no Ray)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from busdiff.config import ConfigError, load_config
from busdiff.data.phantom import write_phantom
from busdiff.finetune.trainer import prepare
from busdiff.generate.prompts import PROMPTS, render_prompt
from busdiff.models.adapters import add_ti_tokens
from tests.sd15_folder import BOS, EOS, MODEL_INDEX, SCHEDULER_CONFIG, VOCAB_SIZE, clip_bpe_path, sd15_folder

#: "ultrasound</w>" in CLIP's vocabulary (and so in SD 1.5's tokenizer/vocab.json).
ULTRASOUND_ID = 29717


@pytest.fixture(scope="session")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sd15_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(sd15: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(sd15), subfolder="tokenizer", local_files_only=True)


@pytest.fixture(scope="module")
def clip_reference():
    """OpenAI CLIP's tokenizer as open_clip ships it, reading the same BPE file."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(str(clip_bpe_path()))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd15-unit") / "busi"
    write_phantom(root, 4, seed=5, size=64)
    return root


def _cfg(phantom: Path, base: Path, out: Path, *sets: str):
    return load_config(None, [
        f"data.root={phantom}",
        "model.preset=pretrained",
        f"model.base={base}",
        "model.device=cpu",
        f"finetune.out={out}",
        "finetune.method=lora-then-ti",
        "finetune.resolution=32",
        "finetune.lora.batch_size=1",
        "finetune.lora.steps=1",
        "finetune.ti.steps=1",
        "finetune.mixed_precision=no",
        *sets,
    ])


def _pieces(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))


# ------------------------------------------------------------------------------------------ the fixture


def test_folder_has_sd15s_layout(sd15: Path):
    assert json.loads((sd15 / "model_index.json").read_text()) == MODEL_INDEX
    assert json.loads((sd15 / "scheduler" / "scheduler_config.json").read_text()) == SCHEDULER_CONFIG
    for sub, files in {
        "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
        "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
        "text_encoder": ["config.json", "model.safetensors"],
        "tokenizer": ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"],
    }.items():
        assert sorted(p.name for p in (sd15 / sub).iterdir()) == files, sub
    text = json.loads((sd15 / "text_encoder" / "config.json").read_text())
    assert text["architectures"] == ["CLIPTextModel"]
    assert (text["vocab_size"], text["max_position_embeddings"], text["eos_token_id"]) == (VOCAB_SIZE, 77, 2)
    merges = (sd15 / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894 and merges[1] == "i n"
    vocab = json.loads((sd15 / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE and (vocab["!"], vocab["!</w>"]) == (0, 256)
    assert (vocab[BOS], vocab[EOS], vocab["ultrasound</w>"]) == (49406, 49407, ULTRASOUND_ID)


def test_tokenizer_tokenizes_like_clip(tokenizer, clip_reference):
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    # CLIP's vocabulary, with OpenAI/HF's names of the two special tokens for open_clip's
    theirs = dict(clip_reference.encoder)
    theirs[BOS], theirs[EOS] = theirs.pop("<start_of_text>"), theirs.pop("<end_of_text>")
    assert tokenizer.get_vocab() == theirs
    texts = [render_prompt(c, t) for c in PROMPTS for t in ("ultrasound", "<bus>", "<bus-benign>")]
    texts += ["Ultrasound, 12 cats! don't", "hypoechoic mass; BI-RADS 4a", "  spaced\tout \n text  ", "ça va",
              "mammography sonogram"]
    texts += [  # a fixed corpus (HTML entities and mojibake, which open_clip repairs first, left out)
        "Hybrid Diffusion Model for Breast Ultrasound Image Augmentation (arXiv:2603.26834)",
        "LoRA r4 at 512 px, batch 4, 3000 steps at lr 1e-4; then TI for 2000 steps at lr 5e-4.",
        "FID 45.97 -> 33.29 with TI + img2img: the real-vs-real floor is 77.95 on busi-256.",
        "benign_0433 / malignant_0145 are byte-identical: a leak across classes and splits!",
        "`busdiff generate jobs/configs/generate-tiny.yaml --set generate.out=s3://BUCKET/x`",
        "A photo of a cat, a dog and two birds... #caption @user 100% #1 ❤️ 日本語 Ünïcödé naïve café",
        "it's they're we've I'm you'll he'd -- don't DON'T Ultrasound ULTRASOUND",
    ]
    differ = [t for t in texts if tokenizer.encode(t, add_special_tokens=False, truncation=False)
              != clip_reference.encode(t)]
    assert not differ, f"{len(differ)} of {len(texts)} texts tokenize otherwise than CLIP, e.g. {differ[:3]}"
    padded = tokenizer("an ultrasound image", padding="max_length", max_length=77).input_ids
    assert padded[:5] == [49406, 550, ULTRASOUND_ID, 2867, 49407] and padded[5:] == [49407] * 72
    assert _pieces(tokenizer, "ultrasound") == ["ultrasound</w>"]  # one whole-word token
    assert _pieces(tokenizer, "hypoechoic") == ["hy", "poe", "cho", "ic</w>"]  # not in CLIP's vocabulary
    assert _pieces(tokenizer, "<ultrasound>") == ["<</w>", "ultrasound</w>", "></w>"]


def test_folder_loads_as_the_pretrained_preset(sd15: Path):
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline

    from busdiff.config import ModelConfig
    from busdiff.models.presets import load_pipelines

    assert isinstance(PNDMScheduler.from_pretrained(str(sd15), subfolder="scheduler"), PNDMScheduler)
    txt, img = load_pipelines(ModelConfig(preset="pretrained", base=str(sd15), device="cpu"))
    assert isinstance(txt, StableDiffusionPipeline) and img.tokenizer is txt.tokenizer
    assert txt.text_encoder.get_input_embeddings().weight.shape == (VOCAB_SIZE, 32)
    assert len(txt.tokenizer) == VOCAB_SIZE
    # the recipe's sampler on SD 1.5's own noise schedule
    assert isinstance(txt.scheduler, DPMSolverMultistepScheduler)
    sched = txt.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule, sched.steps_offset) == (
        0.00085, 0.012, "scaled_linear", 1)
    out = txt(prompt="an ultrasound image", num_inference_steps=2, height=32, width=32, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


# ------------------------------------------------------------------------------ token checks, real vocab


@pytest.mark.parametrize("token", ["ultrasound", "tumor", "cat"])
def test_placeholder_already_in_clips_vocabulary_is_refused_naming_the_field(phantom, sd15, tmp_path, token):
    with pytest.raises(ConfigError, match=rf"^finetune\.ti\.token: .*'{token}' already exists") as e:
        prepare(_cfg(phantom, sd15, tmp_path / "run", f"finetune.ti.token={token}"))
    assert "finetune.ti.initializer_token" not in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_word_the_tiny_vocabulary_lacks_is_refused_only_by_the_real_one(phantom, sd15, tmp_path):
    # "cat" is no whole word of the tiny preset's generated vocabulary, so only CLIP's catches it: the check
    # reads the base model's own tokenizer.
    tiny = load_config(None, [f"data.root={phantom}", "model.preset=tiny", f"finetune.out={tmp_path}/tiny",
                              "finetune.ti.token=cat", "finetune.resolution=32",
                              "finetune.lora.batch_size=1"])
    prepare(tiny)
    with pytest.raises(ConfigError, match="finetune.ti.token"):
        prepare(_cfg(phantom, sd15, tmp_path / "real", "finetune.ti.token=cat"))


def test_bracketed_placeholders_outside_the_vocabulary_are_accepted(phantom, sd15, tmp_path):
    for i, sets in enumerate([["finetune.ti.token=<ultrasound>"],
                              ["finetune.ti.token=<bus>", "finetune.ti.per_class=true"],
                              ["finetune.ti.token=<bus>", "finetune.ti.num_vectors=2"]]):
        assert prepare(_cfg(phantom, sd15, tmp_path / f"run{i}", *sets)).records


def test_initializer_ultrasound_resolves_to_clips_single_token(sd15: Path, tokenizer):
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(str(sd15), subfolder="text_encoder")
    tok = copy.deepcopy(tokenizer)
    added = add_ti_tokens(tok, text_encoder, ["<bus>"], "ultrasound", num_vectors=2)
    assert added == ["<bus>", "<bus>_1"]
    ids = tok.convert_tokens_to_ids(added)
    assert ids == [VOCAB_SIZE, VOCAB_SIZE + 1]  # appended after <|endoftext|>
    weight = text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == VOCAB_SIZE + 2
    for i in ids:
        torch.testing.assert_close(weight[i], weight[ULTRASOUND_ID], rtol=0, atol=0)
    assert not torch.equal(weight[ULTRASOUND_ID], weight[ULTRASOUND_ID + 1])  # rows differ: the id matters
    # the placeholder is one token in a prompt and leaves the other words as CLIP splits them
    prompt = render_prompt("malignant", "<bus>")
    pieces = _pieces(tok, prompt)
    assert pieces.count("<bus>") == 1 and [p for p in pieces if p != "<bus>"] == _pieces(
        tokenizer, render_prompt("malignant", ""))


@pytest.mark.parametrize("word", ["hypoechoic", "sonogram", "ultra sound"])
def test_initializer_that_is_not_one_clip_token_is_refused_naming_the_field(phantom, sd15, tmp_path,
                                                                             clip_reference, word):
    with pytest.raises(ConfigError, match=r"^finetune\.ti\.initializer_token: .*not a single token") as e:
        prepare(_cfg(phantom, sd15, tmp_path / "run", f"finetune.ti.initializer_token={word}"))
    n = len(clip_reference.encode(word))
    assert n > 1 and f"encodes to {n}:" in str(e.value)


def test_placeholder_inside_a_caption_word_is_refused(phantom, sd15, tmp_path, tokenizer):
    # CLIP's vocabulary has no token "ormal" (so the vocabulary check passes), but added tokens match inside
    # words: the normal class's caption would lose its class word.
    assert "ormal" not in tokenizer.get_vocab() and "ormal</w>" not in tokenizer.get_vocab()
    with pytest.raises(ConfigError, match="finetune.ti.token='ormal' occurs inside the caption of normal"):
        prepare(_cfg(phantom, sd15, tmp_path / "run", "finetune.ti.token=ormal"))

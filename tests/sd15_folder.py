"""A Stable Diffusion 1.5 model folder as the hub ships it, with tiny random networks and CLIP's real
tokenizer, for tests that run ``model.preset: pretrained`` (``model.base`` = a local diffusers folder).

The layout, the scheduler, tokenizer and text-encoder configs are SD 1.5's
(``stable-diffusion-v1-5/stable-diffusion-v1-5``); the UNet, VAE and text encoder keep SD 1.5's classes
and structure but are a few hundred thousand parameters (busdiff's ``tiny`` preset), except that the text
encoder keeps CLIP's 49408-row vocabulary and 77 positions. The tokenizer's ``vocab.json`` and
``merges.txt`` are built from CLIP's own BPE file (``bpe_simple_vocab_16e6.txt.gz``, shipped by the
``open_clip_torch`` test dependency) exactly as OpenAI's CLIP builds its vocabulary, so token checks meet
the real vocabulary: "ultrasound" is the one token ``ultrasound</w>`` there, and most short English words
are taken.

:func:`sd15_folder` writes the folder once per test session (under pytest's base temp directory) and
returns its path; test modules wrap it in a session fixture.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

#: CLIP's BPE file: line 0 is a header, lines 1..48894 are the merges CLIP uses (49152 - 256 - 2).
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

#: SD 1.5's ``model_index.json`` (``_diffusers_version`` as on the hub), except that the safety checker and
#: feature extractor are ``null`` (as ``save_pretrained`` writes a pipeline built without them): busdiff
#: loads SD 1.5 with ``safety_checker=None``, so they would never be read.
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

#: SD 1.5's ``scheduler/scheduler_config.json``.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def _special(content: str, typed: bool) -> dict[str, Any]:
    tok: dict[str, Any] = {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
                           "single_word": False}
    return {"__type": "AddedToken", **tok} if typed else tok


#: SD 1.5's ``tokenizer/tokenizer_config.json`` and ``special_tokens_map.json``.
TOKENIZER_CONFIG: dict[str, Any] = {
    "add_prefix_space": False,
    "bos_token": _special(BOS, True),
    "do_lower_case": True,
    "eos_token": _special(EOS, True),
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": EOS,
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": _special(EOS, True),
}
SPECIAL_TOKENS_MAP: dict[str, Any] = {
    "bos_token": _special(BOS, False),
    "eos_token": _special(EOS, False),
    "pad_token": EOS,
    "unk_token": _special(EOS, False),
}


def clip_bpe_path() -> Path:
    """CLIP's BPE merges file as open_clip_torch ships it (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("open_clip_torch is not installed: it is a test dependency (pip install -e '.[test]'); "
                    f"its {BPE_FILE} is CLIP's real BPE vocabulary")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        pytest.fail(f"open_clip_torch is installed but has no {path}")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_vocab(bpe_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges, built as OpenAI's ``SimpleTokenizer`` builds them: the 256 byte
    characters, the same with ``</w>``, one token per merge (lines 1..48894 of the BPE file), then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407)."""
    with gzip.open(bpe_path or clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {N_MERGES} merges of two symbols each")
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP's vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def write_tokenizer(out: Path, bpe_path: Path | None = None) -> Path:
    """``tokenizer/`` as SD 1.5 ships it: vocab.json, merges.txt (with its ``#version`` header), the
    tokenizer config and the special-tokens map; no tokenizer.json, so transformers builds it."""
    vocab, merges = clip_vocab(bpe_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    (out / "merges.txt").write_text(merges_txt, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2))
    return out


def write_sd15_folder(root: Path, seed: int = 0) -> Path:
    """Write the folder at ``root`` (SD 1.5's layout and configs, tiny random networks) and return it."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from busdiff.models.presets import TINY_TEXT, TINY_UNET, TINY_VAE

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(root / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    text_cfg = CLIPTextConfig(**{**TINY_TEXT, "vocab_size": VOCAB_SIZE, "max_position_embeddings": 77})
    CLIPTextModel(text_cfg).save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root


_FOLDERS: dict[Path, Path] = {}


def sd15_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's SD 1.5 folder: written on the first call, the same path after that."""
    key = tmp_path_factory.getbasetemp()
    if key not in _FOLDERS:
        _FOLDERS[key] = write_sd15_folder(tmp_path_factory.mktemp("sd15") / "stable-diffusion-v1-5")
    return _FOLDERS[key]

"""Model presets: where the UNet, VAE, text encoder, tokenizer and scheduler come from.

``tiny``        random-initialised components of the SD 1.5 classes, small enough for CPU tests (seconds).
``sd15-shape``  the full SD 1.5 architecture with random weights (throughput benchmarks, no download).
``pretrained``  ``StableDiffusionPipeline.from_pretrained(cfg.base)``: a hub id or a local diffusers folder.
``miniature``   SD 1.5's classes at miniature size, pretrained here on phantoms (busdiff.models.miniature),
                cached by its recipe's hash and loaded as ``pretrained`` from that folder.

The text2img and img2img pipelines share one set of components, so an adapter loaded into one is
active in the other.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from busdiff.config import ModelConfig

log = logging.getLogger(__name__)

PRESETS = ("tiny", "sd15-shape", "pretrained", "miniature")
MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class ModelLoadError(ValueError):
    """A model could not be built or loaded; the message names the base and how to fix it."""


# --------------------------------------------------------------------------------------------------
# Configs, written out so that nothing is fetched from the hub.

#: SD 1.5 (``stable-diffusion-v1-5/stable-diffusion-v1-5``) ``unet/config.json``.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

#: SD 1.5 ``vae/config.json``.
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

#: SD 1.5 ``text_encoder/config.json`` (CLIP ViT-L/14 text tower). bos/eos/pad ids are the legacy values
#: SD ships; with eos_token_id == 2 transformers pools at argmax(input_ids), i.e. at <|endoftext|>,
#: which is the highest id of the base vocabulary.
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

#: Same classes and structure as SD 1.5 (VAE downsamples by 8, 4 latent channels, cross-attention dim =
#: text hidden size), a few hundred thousand parameters.
TINY_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 8,  # 8 latents x VAE factor 8 -> 64 px default
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}

TINY_VAE: dict[str, Any] = {
    **SD15_VAE,
    "block_out_channels": [32, 32, 32, 32],
    "layers_per_block": 1,
    "sample_size": 64,
}

TINY_TEXT: dict[str, Any] = {
    **SD15_TEXT,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    # vocab_size: set to the generated tokenizer's size
}

#: SD 1.5's noise schedule; DPMSolverMultistep is the sampler of the authors' recipe.
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

#: Words of busdiff's prompts and captions; each becomes one whole-word BPE token of the generated vocab.
PROMPT_WORDS = (
    "ultrasound", "image", "of", "a", "an", "the", "benign", "malignant", "normal", "breast", "lesion",
    "lesions", "with", "without", "smooth", "irregular", "borders", "border", "showing", "tissue", "any",
    "tumor", "or", "and", "mass", "cyst", "photo", "scan", "bus", "busi",
)


# --------------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={device!r} but no CUDA device is available; use auto or cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``model.dtype``; half types fall back to float32 on the CPU (with a warning)."""
    if dtype not in _DTYPES:
        raise ModelLoadError(f"model.dtype={dtype!r}: allowed {sorted(_DTYPES)}")
    resolved = _DTYPES[dtype]
    if resolved != torch.float32 and torch.device(device).type == "cpu":
        log.warning("model.dtype=%s is not used on the CPU (slow or unsupported there): using float32", dtype)
        return torch.float32
    return resolved


# --------------------------------------------------------------------------------------------------
# Tokenizer from a generated vocabulary


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
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


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the lowest-ranked adjacent pair."""
    word = list(symbols)
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def generated_vocab(words: tuple[str, ...] = PROMPT_WORDS, vocab_size: int | None = None
                    ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-layout BPE vocabulary: 256 byte characters, the same with ``</w>``, whole-word tokens for
    ``words`` (with the merges that build them), optional filler rows up to ``vocab_size``, then
    ``<|startoftext|>`` and ``<|endoftext|>`` last (as in SD 1.5, where they are 49406 and 49407)."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(tokens)
    # Longest words first; each word's merges join the pieces the earlier merges leave, left to right.
    for word in sorted(dict.fromkeys(words), key=lambda w: (-len(w), w)):
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        left = pieces[0]
        for right in pieces[1:]:
            pair = (left, right)
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            left = left + right
            if left not in known:
                known.add(left)
                tokens.append(left)
    n_fill = 0 if vocab_size is None else vocab_size - len(tokens) - 2
    if n_fill < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the generated vocabulary's {len(tokens) + 2}")
    tokens += [f"<|unused{i}|>" for i in range(n_fill)]  # unreachable by BPE: rows only
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(vocab_size: int | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer over :func:`generated_vocab` (built in memory; nothing read from disk or hub)."""
    vocab, merges = generated_vocab(vocab_size=vocab_size)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)


# --------------------------------------------------------------------------------------------------
# Components


def _scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**SD15_SCHEDULER)


def build_components(preset: str, seed: int = 0) -> dict[str, Any]:
    """Random-initialised pipeline components (``tiny`` or ``sd15-shape``), the same weights for the same
    seed. Keys are those of ``StableDiffusionPipeline(**components)``."""
    if preset == "tiny":
        unet_cfg, vae_cfg, text_cfg, vocab_size = TINY_UNET, TINY_VAE, TINY_TEXT, None
    elif preset == "sd15-shape":
        unet_cfg, vae_cfg, text_cfg, vocab_size = SD15_UNET, SD15_VAE, SD15_TEXT, SD15_TEXT["vocab_size"]
    else:
        raise ModelLoadError(f"model.preset={preset!r} has no built-in components; allowed: tiny, sd15-shape")
    tokenizer = build_tokenizer(vocab_size)
    text_cfg = {**text_cfg, "vocab_size": len(tokenizer)}
    return components_from_configs(unet_cfg, vae_cfg, text_cfg, tokenizer, seed)


def components_from_configs(unet_cfg: dict[str, Any], vae_cfg: dict[str, Any], text_cfg: dict[str, Any],
                            tokenizer: CLIPTokenizer, seed: int) -> dict[str, Any]:
    """SD 1.5's component classes built from these configs, initialised from ``seed``, in eval mode, with
    SD 1.5's DPMSolver schedule: the keys of ``StableDiffusionPipeline(**components)``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    for m in (unet, vae, text_encoder):
        m.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": _scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def model_id(cfg: ModelConfig) -> str:
    """A stable name of the base model (recorded in adapter.json and provenance): the preset name for the
    random presets, ``cfg.base`` (trailing slash removed) for ``pretrained``, ``busdiff-miniature-<recipe
    hash16>`` for ``miniature`` (the same wherever its cache folder is)."""
    if cfg.preset == "pretrained":
        return cfg.base.rstrip("/") or cfg.base
    if cfg.preset == "miniature":
        from busdiff.models.miniature import miniature_id  # lazy: that module imports this one

        return miniature_id(cfg.miniature)
    return cfg.preset


def resolve_miniature(cfg: ModelConfig) -> ModelConfig:
    """``preset: miniature`` -> the same config as ``preset: pretrained`` with ``base`` = the recipe's cached
    pipeline folder, pretraining it first when missing (minutes, printed); other presets unchanged. For
    loading only: name the base with ``model_id`` of the original config."""
    if cfg.preset != "miniature":
        return cfg
    from busdiff.models.miniature import pretrain_miniature

    return cfg.model_copy(update={"preset": "pretrained", "base": str(pretrain_miniature(cfg.miniature))})


_HOW_TO_POINT = (
    "Point at a local diffusers folder (one with model_index.json, made by e.g. "
    "`hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir /path/to/stable-diffusion-v1-5` "
    "(`huggingface-cli download` in older huggingface_hub) "
    "or `pipe.save_pretrained(...)`) with --set model.base=/path/to/stable-diffusion-v1-5"
)


def _offline_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub import errors as hf_errors

        names = ("HfHubHTTPError", "LocalEntryNotFoundError", "RepositoryNotFoundError", "HFValidationError")
        errors += [getattr(hf_errors, n) for n in names if hasattr(hf_errors, n)]
    except ImportError:  # pragma: no cover - huggingface_hub is a diffusers dependency
        pass
    return tuple(errors)


def _load_pretrained(base: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    path = Path(base).expanduser()
    kwargs: dict[str, Any] = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"model.base={base!r} is a file; it must be a diffusers folder with model_index.json"
            )
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model.base={base!r}: the directory {path} has no model_index.json, so it is not a "
                f"diffusers pipeline folder. {_HOW_TO_POINT}"
            )
        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(
                f"model.base={base!r}: could not load the diffusers folder {path}: {e}"
            ) from e
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(base, **kwargs)
        except (*_offline_errors(), ValueError) as e:
            raise ModelLoadError(
                f"model.base={base!r} could not be loaded: it is not a local directory, and it was not found "
                f"in the Hugging Face cache nor downloaded from the hub (offline, or HF_HUB_OFFLINE=1?). "
                f"{_HOW_TO_POINT}. Cause: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        # The recipe's sampler, on the base's own noise schedule.
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def load_pipelines(cfg: ModelConfig, device: torch.device | None = None
                   ) -> tuple[StableDiffusionPipeline, StableDiffusionImg2ImgPipeline]:
    """Text2img and img2img pipelines sharing one set of components, on ``device`` (default: from
    ``cfg.device``) in ``cfg.dtype`` (float32 on the CPU), progress bars off."""
    device = torch.device(device) if device is not None else resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    cfg = resolve_miniature(cfg)
    if cfg.preset == "pretrained":
        txt = _load_pretrained(cfg.base, dtype)
    else:
        comps = build_components(cfg.preset, seed=cfg.seed)
        for comp in comps.values():
            if isinstance(comp, torch.nn.Module) and comp.dtype != dtype:
                # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast
                torch.nn.Module.to(comp, dtype=dtype)
        txt = StableDiffusionPipeline(**comps, requires_safety_checker=False)
    txt = txt.to(device)
    img = StableDiffusionImg2ImgPipeline(**txt.components, requires_safety_checker=False)
    for p in (txt, img):
        p.set_progress_bar_config(disable=True)
    return txt, img


# ---- ControlNet (generate.controlnet) ----
#: the conditioning encoder of the preset ControlNet: small, as the base it copies (diffusers' default is
#: (16, 32, 96, 256)); its three stride-2 stages bring the image to the latents' size (VAE factor 8)
PRESET_CONTROLNET_CHANNELS = (8, 16, 32, 64)


def controlnet_id(model: str, base_id: str) -> str:
    """A stable name of a ControlNet (recorded in the generation recipe): ``preset:<base id>`` for the
    preset one, a local folder resolved, a hub id as given."""
    if model == "preset":
        return f"preset:{base_id}"
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model.rstrip("/")


def preset_controlnet(unet: UNet2DConditionModel, seed: int, random_zero_convs: bool) -> Any:
    """A ControlNet made from ``unet`` the way diffusers' train_controlnet.py starts one: a copy of its
    encoder and middle block, zero-initialised output convolutions (no effect until trained). With
    ``random_zero_convs`` (the random ``tiny`` base) those are seeded random instead, so that the mask
    visibly shapes the output of an untrained CPU run."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=PRESET_CONTROLNET_CHANNELS)
    if random_zero_convs:
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block,
                     cn.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(conv.weight, std=0.05)
    return cn.eval()


def load_controlnet(model: str, cfg: ModelConfig, dtype: torch.dtype) -> Any:
    """The ControlNetModel of ``generate.controlnet.model``: ``preset`` (see :func:`preset_controlnet`; for
    the tiny and miniature bases only, made from the base's own UNet, without any adapter), a local
    diffusers folder, or a hub id."""
    from diffusers import ControlNetModel

    if model == "preset":
        if cfg.preset not in ("tiny", "miniature"):
            raise ModelLoadError(
                f"generate.controlnet.model=preset is for the tiny and miniature bases, not model.preset="
                f"{cfg.preset!r}: give a ControlNet folder or hub id (the authors': "
                "lllyasviel/sd-controlnet-canny)"
            )
        base, _ = load_pipelines(cfg.model_copy(update={"dtype": "float32"}), torch.device("cpu"))
        cn = preset_controlnet(base.unet, cfg.seed, random_zero_convs=cfg.preset == "tiny")
        return torch.nn.Module.to(cn, dtype=dtype)  # (ModelMixin.to warns on every dtype cast)
    path = Path(model).expanduser()
    try:
        if path.exists():
            return ControlNetModel.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
        return ControlNetModel.from_pretrained(model, torch_dtype=dtype)
    except (*_offline_errors(), ValueError, KeyError) as e:
        where = f"the folder {path}" if path.exists() else "no local folder, not found on the hub (offline?)"
        raise ModelLoadError(
            f"generate.controlnet.model={model!r} could not be loaded: {where}. Cause: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e

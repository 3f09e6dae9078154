"""LoRA and textual-inversion adapters in the formats plain diffusers loads.

An adapter directory holds:

- ``pytorch_lora_weights.safetensors``: UNet LoRA in diffusers format (``unet.``-prefixed keys, the peft
  LoraConfig in the safetensors metadata so that ``lora_alpha`` survives), loadable with
  ``pipe.load_lora_weights(adapter_dir)``.
- ``learned_embeds.safetensors``: one textual-inversion placeholder, ``{token: tensor[num_vectors, dim]}``,
  loadable with ``pipe.load_textual_inversion(path)``. diffusers reads only one token per file, so a second
  placeholder goes to ``learned_embeds_1.safetensors`` and so on.
- ``adapter.json``: base model, tokens, rank, sha256 of every file, the training image ids, the busdiff
  version and the creation time.

Only safetensors are written or read: nothing executable is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

ADAPTER_JSON = "adapter.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
TI_FILE = "learned_embeds.safetensors"
FORMAT = "busdiff-adapter/1"
DEFAULT_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_PORTABLE_LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora",
                       "rank_pattern", "alpha_pattern", "init_lora_weights")


class AdapterError(ValueError):
    """An adapter directory is missing, incomplete, tampered with, or for another base model."""


def _busdiff_version() -> str:
    try:
        from importlib.metadata import version

        return version("busdiff")
    except Exception:  # not installed (e.g. run from a source tree)
        return "unknown"


# --------------------------------------------------------------------------------------------------
# LoRA


def add_lora(unet: torch.nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0) -> None:
    """Add a trainable LoRA adapter (peft ``LoraConfig`` via ``unet.add_adapter``) to the attention
    projections; ``alpha`` defaults to ``rank`` (scale 1). A is gaussian, B is zero: the UNet's output is
    unchanged until B is trained."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    cfg = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                     init_lora_weights="gaussian", target_modules=list(target_modules))
    unet.add_adapter(cfg)


def add_text_encoder_lora(text_encoder: torch.nn.Module, rank: int = 4, alpha: float | None = None,
                          target_modules: Sequence[str] = TEXT_ENCODER_TARGETS, dropout: float = 0.0) -> None:
    """Add a trainable LoRA adapter to the CLIP text encoder's attention projections. peft injects it
    directly: transformers 5.24's own ``add_adapter`` demands peft >= 0.22, which the registry lacks."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    cfg = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                     init_lora_weights="gaussian", target_modules=list(target_modules))
    inject_adapter_in_model(cfg, text_encoder, adapter_name="default")
    text_encoder._busdiff_lora_config = cfg


def _portable(cfg: Any) -> dict[str, Any]:
    full = cfg.to_dict()
    # diffusers rebuilds the config with LoraConfig(**metadata): keep the fields every recent peft knows, so
    # that an older peft can read the file too (peft 0.21's to_dict has fields older releases reject).
    meta = {k: full[k] for k in _PORTABLE_LORA_KEYS if k in full}
    meta["target_modules"] = sorted(meta.get("target_modules") or [])
    return meta


def _text_encoder_lora_state(text_encoder: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from diffusers.utils import convert_state_dict_to_diffusers

    cfg = getattr(text_encoder, "_busdiff_lora_config", None)
    if cfg is None:
        raise ValueError("lora_text_encoder=True but the text encoder has no LoRA (add_text_encoder_lora)")
    # peft's key names without the adapter name ("lora_A.default.weight" -> "lora_A.weight"), then diffusers'
    raw = {k.replace(".default.", "."): v for k, v in text_encoder.state_dict().items() if ".lora_" in k}
    state = convert_state_dict_to_diffusers(raw)
    # diffusers' loader expects CLIPTextModel's "text_model." prefix, which transformers 5's keys lack.
    state = {(k if k.startswith("text_model.") else f"text_model.{k}"): v.detach().to("cpu").contiguous()
             for k, v in state.items()}
    return state, _portable(cfg)


def _lora_state(unet: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    peft_config = getattr(unet, "peft_config", None) or {}
    if not peft_config:
        raise ValueError("lora_unet=True but the UNet has no LoRA adapter (call add_lora first)")
    if len(peft_config) > 1:
        raise ValueError(f"the UNet has several adapters {sorted(peft_config)}; save expects exactly one")
    name, cfg = next(iter(peft_config.items()))
    state = get_peft_model_state_dict(unet, adapter_name=name)
    state = convert_state_dict_to_diffusers(state)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return state, _portable(cfg)


# --------------------------------------------------------------------------------------------------
# Textual inversion


def _vector_tokens(tokenizer: Any, token: str) -> list[str]:
    """``[token, token_1, token_2, ...]`` as diffusers' multi-vector convention, as far as they exist."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ValueError(f"textual-inversion token {token!r} is not in the tokenizer (add_ti_tokens first)")
    out = [token]
    while f"{token}_{len(out)}" in vocab:
        out.append(f"{token}_{len(out)}")
    return out


def add_ti_tokens(tokenizer: Any, text_encoder: Any, tokens: Sequence[str], initializer_token: str,
                  num_vectors: int = 1) -> list[str]:
    """Add placeholder tokens for textual inversion and initialise their embedding rows from
    ``initializer_token``. With ``num_vectors`` > 1 each placeholder ``<t>`` gets the tokens
    ``<t>, <t>_1, ...`` (diffusers' multi-vector convention; its pipelines expand ``<t>`` in prompts).
    Returns every added token, in id order. Raises ValueError naming the token when it already exists or
    does not survive the tokenizer's normalisation (CLIP lowercases), and when the initializer is not one
    token."""
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
    if not tokens:
        raise ValueError("no textual-inversion tokens given")
    init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(init_ids)
        raise ValueError(f"initializer token {initializer_token!r} is not a single token of the tokenizer "
                         f"(it encodes to {len(init_ids)}: {pieces}); pick a word the vocabulary holds")
    vocab = tokenizer.get_vocab()
    new: list[str] = []
    for t in tokens:
        expanded = [t] + [f"{t}_{i}" for i in range(1, num_vectors)]
        for e in expanded + [f"{t}_1"]:
            # CLIP stores a whole word as "word</w>": "ultrasound" is taken though it is not a key itself.
            if e in vocab or f"{e}</w>" in vocab or e in new:
                raise ValueError(f"textual-inversion token {e!r} already exists in the tokenizer vocabulary; "
                                 f"choose another placeholder (e.g. '<{t.strip('<>')}-bus>')")
        new += expanded
    added = tokenizer.add_tokens(new)
    if added != len(new):
        raise ValueError(f"the tokenizer added {added} of the tokens {new}")
    ids = tokenizer.convert_tokens_to_ids(new)
    for t, i in zip(new, ids, strict=True):
        if tokenizer.encode(t, add_special_tokens=False) != [i]:
            raise ValueError(f"textual-inversion token {t!r} does not encode to itself (the CLIP tokenizer "
                             f"lowercases text: use a lowercase placeholder)")
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        text_encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = weight[init_ids[0]].clone().expand(len(ids), -1)
    return new


def _ti_state(tokenizer: Any, text_encoder: Any, token: str) -> tuple[torch.Tensor, list[str]]:
    names = _vector_tokens(tokenizer, token)
    ids = tokenizer.convert_tokens_to_ids(names)
    weight = text_encoder.get_input_embeddings().weight
    return weight[ids].detach().to("cpu", torch.float32).contiguous(), names


def _ti_file(index: int) -> str:
    return TI_FILE if index == 0 else f"learned_embeds_{index}.safetensors"


# --------------------------------------------------------------------------------------------------
# Files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # directories cannot be fsynced everywhere
        pass
    finally:
        os.close(fd)


def _component(components: Any, name: str) -> Any:
    if isinstance(components, Mapping):
        return components.get(name)
    return getattr(components, name, None)


def save_adapters(out_dir: str | Path, components: Any, *, lora_unet: bool, ti_tokens: Sequence[str] | None,
                  base_model: str, trained_ids: Sequence[str], extra: dict[str, Any] | None = None,
                  lora_text_encoder: bool = False, class_tokens: dict[str, str] | None = None) -> dict:
    """Write the adapter of ``components`` (a pipeline, or a mapping with ``unet``, ``text_encoder``,
    ``tokenizer``) into ``out_dir``: the UNet LoRA when ``lora_unet`` (with the text encoder's in the same
    file, as ``load_lora_weights`` reads it, when ``lora_text_encoder``), one embedding file per placeholder
    in ``ti_tokens``, and ``adapter.json`` (with ``class_tokens``: the token each class's prompt takes). The
    directory is written beside ``out_dir`` and renamed into
    place, so ``out_dir`` is either the previous complete adapter or the new one, never a half one (an
    existing ``out_dir`` is replaced). Returns the adapter.json content."""
    out_dir = Path(out_dir)
    ti_tokens = list(ti_tokens or [])
    if lora_text_encoder and not lora_unet:
        raise ValueError("lora_text_encoder needs lora_unet: both LoRAs go into one file")
    if not lora_unet and not ti_tokens:
        raise ValueError("nothing to save: lora_unet is False and no ti_tokens given")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta: dict[str, Any] = {
            "format": FORMAT,
            "base_model": base_model,
            "busdiff_version": _busdiff_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rank": None,
            "lora": None,
            "tokens": ti_tokens,
            "class_tokens": dict(class_tokens or {}),
            "textual_inversion": [],
            "files": {},
            "trained_ids": [str(i) for i in trained_ids],
            "extra": dict(extra or {}),
        }
        if lora_unet:
            from diffusers import StableDiffusionPipeline

            state, lora_cfg = _lora_state(_component(components, "unet"))
            te_state, te_cfg = (_text_encoder_lora_state(_component(components, "text_encoder"))
                                if lora_text_encoder else (None, None))
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, weight_name=LORA_FILE,
                                                      safe_serialization=True,
                                                      unet_lora_adapter_metadata=lora_cfg,
                                                      text_encoder_lora_layers=te_state,
                                                      text_encoder_lora_adapter_metadata=te_cfg)
            meta["rank"] = int(lora_cfg["r"])
            meta["lora"] = {
                "file": LORA_FILE,
                "rank": int(lora_cfg["r"]),
                "alpha": lora_cfg["lora_alpha"],
                "dropout": lora_cfg.get("lora_dropout", 0.0),
                "target_modules": sorted(lora_cfg["target_modules"]),
                "tensors": len(state),
                "text_encoder": None if te_state is None else {
                    "rank": int(te_cfg["r"]), "alpha": te_cfg["lora_alpha"],
                    "target_modules": te_cfg["target_modules"], "tensors": len(te_state)},
            }
        tokenizer, text_encoder = _component(components, "tokenizer"), _component(components, "text_encoder")
        for i, token in enumerate(ti_tokens):
            emb, names = _ti_state(tokenizer, text_encoder, token)
            name = _ti_file(i)
            save_file({token: emb}, str(tmp / name), metadata={"format": "pt"})
            meta["textual_inversion"].append(
                {"token": token, "file": name, "num_vectors": len(names), "vector_tokens": names,
                 "dim": int(emb.shape[1])})
        for f in sorted(p for p in tmp.iterdir() if p.is_file()):
            _fsync(f)
            meta["files"][f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
        (tmp / ADAPTER_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        _fsync(tmp / ADAPTER_JSON)
        _fsync(tmp)
        _swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("adapter written to %s (%s)", out_dir, ", ".join(meta["files"]))
    return meta


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp.rename(out_dir)
    else:
        if not out_dir.is_dir():
            raise AdapterError(f"adapter output {out_dir} exists and is not a directory")
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except BaseException:
            old.rename(out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync(out_dir.parent)


def local_adapter_dir(adapter_dir: str | Path) -> Path:
    """``adapter_dir`` as a local folder: a local path as it is; an object-store URI (``s3://...``, a
    study's adapters in a bucket) copied once into ``~/.cache/busdiff/adapters/``, keyed by the URI and its
    adapter.json, so that diffusers' loaders (local files only) can read it. Each object is checked against
    adapter.json's sha256 as it arrives (an AdapterError naming it otherwise)."""
    from busdiff.storage import is_uri, local_path, read_bytes, write_bytes

    if not is_uri(adapter_dir):
        return local_path(adapter_dir)
    uri = str(adapter_dir).rstrip("/")
    raw = read_bytes(f"{uri}/{ADAPTER_JSON}")
    if raw is None:
        raise AdapterError(f"{uri}/{ADAPTER_JSON} is missing: {uri} is not a (complete) busdiff adapter")
    try:
        files = json.loads(raw).get("files") or {}
        files = {str(k): dict(v) for k, v in files.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
        raise AdapterError(f"{uri}/{ADAPTER_JSON} is not a busdiff adapter.json: {e}") from e
    key = hashlib.blake2b(uri.encode() + b"\0" + raw, digest_size=12).hexdigest()
    local = Path.home() / ".cache" / "busdiff" / "adapters" / key
    for name, info in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            continue  # refused by read_adapter_json, naming the file
        f = local / name
        if f.is_file() and _sha256(f) == info.get("sha256"):
            continue
        data = read_bytes(f"{uri}/{name}")
        if data is None:
            raise AdapterError(f"adapter file {uri}/{name} listed in {ADAPTER_JSON} is missing")
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.get("sha256"):
            raise AdapterError(f"adapter file {uri}/{name} does not match its sha256 in {ADAPTER_JSON} "
                               f"(file {digest[:12]}..., recorded {str(info.get('sha256'))[:12]}...): "
                               f"it was modified or truncated")
        write_bytes(f, data)
    write_bytes(local / ADAPTER_JSON, raw)  # last: a folder with adapter.json is complete
    return local


def read_adapter_json(adapter_dir: str | Path) -> dict:
    """adapter.json of ``adapter_dir`` (a folder or an object-store URI, :func:`local_adapter_dir`),
    after checking that every file it lists exists and has the recorded sha256 (AdapterError naming the
    file otherwise)."""
    adapter_dir = local_adapter_dir(adapter_dir)
    path = adapter_dir / ADAPTER_JSON
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory {adapter_dir} does not exist")
    if not path.is_file():
        raise AdapterError(f"{path} is missing: {adapter_dir} is not a (complete) busdiff adapter")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    missing = [k for k in ("base_model", "files", "tokens", "rank", "trained_ids") if k not in meta]
    if missing:
        raise AdapterError(f"{path} lacks the fields {missing}")
    files = meta["files"]
    referenced = [e["file"] for e in meta.get("textual_inversion") or []]
    if meta.get("lora"):
        referenced.append(meta["lora"]["file"])
    for name in referenced:
        if name not in files:
            raise AdapterError(f"{path} references {name} but has no hash for it")
    for name, info in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise AdapterError(f"{path} lists the file {name!r}: only plain file names are allowed")
        f = adapter_dir / name
        if not f.is_file():
            raise AdapterError(f"adapter file {f} listed in {ADAPTER_JSON} is missing")
        digest = _sha256(f)
        if digest != info.get("sha256"):
            raise AdapterError(f"adapter file {f} does not match its sha256 in {ADAPTER_JSON} "
                               f"(file {digest[:12]}..., recorded {str(info.get('sha256'))[:12]}...): "
                               f"it was modified or truncated")
    return meta


def adapter_class_tokens(meta: dict[str, Any] | None, classes: Sequence[str],
                         default: str) -> dict[str, str]:
    """The word each class's prompt puts at ``{token}`` for the adapter ``meta`` (adapter.json): its
    ``class_tokens`` map (``extra.class_tokens`` in adapters of busdiff 0.1), one shared TI token for every
    class, or ``default`` without TI. Several tokens and no map is an AdapterError: guessing would give every
    class the first class's token."""
    tokens = list((meta or {}).get("tokens") or [])
    if not tokens:
        return {c: default for c in classes}
    mapping = meta.get("class_tokens") or (meta.get("extra") or {}).get("class_tokens") or {}
    if mapping:
        missing = [c for c in classes if c not in mapping]
        unknown = sorted(set(mapping[c] for c in classes if c in mapping) - set(tokens))
        if missing or unknown:
            raise AdapterError(f"adapter.json class_tokens {mapping} lacks the classes {missing} or names "
                               f"tokens {unknown} the adapter does not have (its tokens: {tokens})")
        return {c: mapping[c] for c in classes}
    if len(tokens) == 1:
        return {c: tokens[0] for c in classes}
    raise AdapterError(f"adapter.json has {len(tokens)} tokens {tokens} and no class_tokens map saying which "
                       "class each belongs to: re-save it with busdiff, or set the token explicitly")


def check_adapter_base(adapter_dir: str | Path, base_model: str, meta: dict | None = None) -> dict:
    """Refuse an adapter trained on another base than ``base_model`` (cheap: reads adapter.json only, so
    callers can ask before building a pipeline). Returns the adapter.json content."""
    meta = meta if meta is not None else read_adapter_json(adapter_dir)
    if meta["base_model"] != base_model:
        raise AdapterError(f"adapter {adapter_dir} was trained on base model {meta['base_model']!r}, "
                           f"but the pipeline's base model is {base_model!r}")
    return meta


def load_adapters(pipe: Any, adapter_dir: str | Path, base_model: str | None = None) -> dict:
    """Verify ``adapter_dir`` (:func:`read_adapter_json`) and load it into ``pipe`` with diffusers'
    ``load_lora_weights`` and ``load_textual_inversion``. Components shared with another pipeline (the
    img2img one of :func:`busdiff.models.presets.load_pipelines`) see the adapter too. With ``base_model``
    given, refuses an adapter trained on another base. Returns the adapter.json content."""
    adapter_dir = local_adapter_dir(adapter_dir)
    meta = read_adapter_json(adapter_dir)
    if base_model is not None:
        check_adapter_base(adapter_dir, base_model, meta)
    if meta.get("lora"):
        pipe.load_lora_weights(str(adapter_dir), weight_name=meta["lora"]["file"])
    ti = meta.get("textual_inversion") or []
    if ti:
        pipe.load_textual_inversion([str(adapter_dir / e["file"]) for e in ti])
    return meta

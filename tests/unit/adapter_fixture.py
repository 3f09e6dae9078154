"""A real textual-inversion adapter of the tiny preset, saved by busdiff's own save_adapters."""

from __future__ import annotations

from pathlib import Path

import torch

from busdiff.config import CLASSES
from busdiff.models.adapters import add_ti_tokens, save_adapters
from busdiff.models.presets import build_components


def ti_adapter(path: Path, class_tokens: dict[str, str] | str, base_model: str = "tiny",
               trained_ids: tuple[str, ...] = ("benign_0001",)) -> Path:
    """One shared token (a str) or one per class (a mapping), initialised from "ultrasound" and nudged
    so the embedding differs from its initialiser."""
    mapping = {c: class_tokens for c in CLASSES} if isinstance(class_tokens, str) else dict(class_tokens)
    names = list(dict.fromkeys(mapping.values()))
    comps = build_components("tiny", seed=0)
    add_ti_tokens(comps["tokenizer"], comps["text_encoder"], names, "ultrasound")
    with torch.no_grad():
        comps["text_encoder"].get_input_embeddings().weight[-len(names):] += 1.0
    save_adapters(path, comps, lora_unet=False, ti_tokens=names, base_model=base_model,
                  trained_ids=list(trained_ids), class_tokens=mapping)
    return path

"""What a fine-tuning run trains, in which order, on which text: phases, placeholder tokens, captions.

Everything here is derived from the config alone, so the driver (checks before any worker starts) and
every worker compute the same plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from busdiff.config import CLASSES, FinetuneConfig
from busdiff.generate.prompts import DEFAULT_TOKEN, PROMPTS, render_prompt


@dataclass(frozen=True)
class Phase:
    """One stretch of optimizer steps with a fixed set of trainable parameters."""

    name: str
    lora: bool  # the UNet's LoRA weights train
    ti: bool  # the placeholder tokens' embedding rows train
    steps: int
    batch_size: int  # per worker, per micro-batch
    grad_accum: int
    lr_lora: float
    lr_ti: float

    def samples_per_step(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def phases(ft: FinetuneConfig) -> list[Phase]:
    """The phases of ``ft.method``: one, or two for ``lora-then-ti`` (LoRA first, then TI on top)."""
    lo, ti = ft.lora, ft.ti
    lora_phase = Phase("lora", True, False, lo.steps, lo.batch_size, lo.grad_accum, lo.lr, ti.lr)
    ti_phase = Phase("ti", False, True, ti.steps, ti.batch_size, ti.grad_accum, lo.lr, ti.lr)
    if ft.method == "lora":
        return [lora_phase]
    if ft.method == "ti":
        return [ti_phase]
    if ft.method == "lora+ti":  # pivotal tuning: one schedule, both parts at their own lr
        return [Phase("lora+ti", True, True, lo.steps, lo.batch_size, lo.grad_accum, lo.lr, ti.lr)]
    if ft.method == "lora-then-ti":
        return [lora_phase, ti_phase]
    raise ValueError(
        f"finetune.method={ft.method!r}: allowed {', '.join(('lora', 'ti', 'lora+ti', 'lora-then-ti'))}"
    )


def uses_lora(ft: FinetuneConfig) -> bool:
    return any(p.lora for p in phases(ft))


def uses_ti(ft: FinetuneConfig) -> bool:
    return any(p.ti for p in phases(ft))


def class_tokens(ft: FinetuneConfig) -> dict[str, str]:
    """The word each class's caption puts at ``{token}``: the placeholder (one shared, or one per class
    ``<bus-benign>``...) when TI trains, else the plain word ``ultrasound``."""
    if not uses_ti(ft):
        return {c: DEFAULT_TOKEN for c in CLASSES}
    if ft.ti.per_class:
        stem = ft.ti.token.strip("<>") or "tok"
        return {c: f"<{stem}-{c}>" for c in CLASSES}
    return {c: ft.ti.token for c in CLASSES}


def placeholder_tokens(ft: FinetuneConfig) -> list[str]:
    """The new tokens to add to the tokenizer (none without TI), in class order."""
    if not uses_ti(ft):
        return []
    return list(dict.fromkeys(class_tokens(ft).values()))


def caption_templates(ft: FinetuneConfig) -> dict[str, str]:
    """Caption template per class: ``finetune.captions`` or the generation prompts, so that training and
    generation condition on the same text."""
    return dict(ft.captions or PROMPTS)


def captions(ft: FinetuneConfig, vector_tokens: dict[str, list[str]] | None = None) -> dict[str, str]:
    """The caption of each class with its token in place. ``vector_tokens`` (token -> ``[<t>, <t>_1, ...]``)
    expands a multi-vector token the way diffusers' pipelines do at generation time."""
    toks = class_tokens(ft)
    out = {}
    for c in CLASSES:
        text = render_prompt(c, toks[c], caption_templates(ft))
        vectors = (vector_tokens or {}).get(toks[c])
        if vectors and len(vectors) > 1:
            text = text.replace(toks[c], " ".join(vectors))
        out[c] = text
    return out

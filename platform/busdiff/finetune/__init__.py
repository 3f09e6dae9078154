"""Fine-tuning LoRA and textual-inversion adapters on Ray Train.

``run_finetune(cfg)`` (busdiff.finetune.trainer) is the stage; ``busdiff finetune CONFIG`` and
jobs/finetune.py call it. Imported lazily so that ``busdiff --help`` does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FinetuneError", "FinetuneResult", "prepare", "run_finetune"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from busdiff.finetune import trainer

        return getattr(trainer, name)
    raise AttributeError(name)

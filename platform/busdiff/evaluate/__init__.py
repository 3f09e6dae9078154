"""Evaluation: FID/KID per class with the real-vs-real floor, classifier experiments as Ray tasks,
memorization audit, metrics.json + report.html. Entry points: :func:`run_evaluate` (``busdiff evaluate``,
jobs/evaluate.py) and :func:`run_fid` (``busdiff fid``)."""

from __future__ import annotations

from typing import Any

__all__ = ["EvaluateResult", "run_evaluate", "run_fid"]


def __getattr__(name: str) -> Any:
    # Lazy: `busdiff --help` imports the CLI wiring without torch.
    if name == "run_fid":
        from busdiff.evaluate.compare import run_fid

        return run_fid
    if name in ("run_evaluate", "EvaluateResult"):
        from busdiff.evaluate import run

        return getattr(run, name)
    raise AttributeError(name)

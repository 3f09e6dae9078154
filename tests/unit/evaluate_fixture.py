"""Test data for the evaluation stage: phantom "real" data and synthetic folders in the generation
sink's layout (``<class>/<id>.png``), made from the phantom generator with another seed."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

from busdiff.config import CLASSES
from busdiff.data.phantom import write_phantom
from busdiff.evaluate.inception import InceptionWeights, resolve_weights
from busdiff.evaluate.inputs import write_phantom_synthetic


def real_phantom(root: Path, n_per_class: int, size: int = 64, seed: int = 1) -> Path:
    """Kaggle-layout phantom data (assign_splits gives it train/val/test)."""
    write_phantom(root, n_per_class, seed=seed, size=size)
    return root


def synthetic_folder(root: Path, n_per_class: int, size: int = 64, seed: int = 2) -> Path:
    """``root/<class>/syn_<class>_<k>.png`` (no masks), as the generation sink writes samples/."""
    write_phantom_synthetic(root, n_per_class, seed=seed, size=size)
    assert {d.name for d in root.iterdir()} == set(CLASSES)
    return root


_WEIGHTS_DIR: Path | None = None


def shared_cache_dir() -> Path:
    """One converted copy of the Inception weights for this test process (the conversion takes seconds);
    removed at exit. Tests that check the cache itself use their own directories for the features."""
    global _WEIGHTS_DIR
    if _WEIGHTS_DIR is None:
        _WEIGHTS_DIR = Path(tempfile.mkdtemp(prefix="busdiff-eval-cache-"))
        atexit.register(shutil.rmtree, _WEIGHTS_DIR, True)
        resolve_weights("auto", _WEIGHTS_DIR, download_timeout_s=0)
    return _WEIGHTS_DIR


def shared_weights() -> InceptionWeights:
    return resolve_weights("auto", shared_cache_dir(), download_timeout_s=0)


def fresh_cache_dir(path: Path) -> Path:
    """A cache directory with the converted weights (hard-linked, no copy) and no cached features."""
    path.mkdir(parents=True, exist_ok=True)
    weights = shared_weights().path
    target = path / weights.name
    if not target.exists():
        try:
            os.link(weights, target)
        except OSError:  # another filesystem
            shutil.copy(weights, target)
    return path


def adapter_json_only(path: Path, trained_ids: list[str]) -> Path:
    """An adapter folder with only adapter.json, as models.adapters.save_adapters writes it (the leakage
    guard reads trained_ids; it needs no weight files)."""
    path.mkdir(parents=True)
    meta = {
        "format": "busdiff-adapter/1",
        "base_model": "tiny",
        "tokens": [],
        "rank": 4,
        "files": {},
        "trained_ids": trained_ids,
    }
    (path / "adapter.json").write_text(json.dumps(meta))
    return path

"""Inception features of image sets, cached by content so no image is ever embedded twice.

A cached feature's key is ``(extractor id, sha256 of the image file)``: the extractor id names the weights'
hash, the preprocessing version (:mod:`busdiff.evaluate.inception`) and the arithmetic (device kind and
precision: CUDA convolutions use TF32 by default and differ from the CPU's in the last bits), so features
from other weights or hardware never mix in, and a renamed or copied file still hits the cache. The cache
is one small ``.npy`` per image under ``<cache_dir>/features/<extractor id>/``, written atomically, so
concurrent runs share it safely.

Images of any size and mode are accepted: each is converted to 8-bit RGB the way torch-fidelity does
(``PIL.Image.convert("RGB")``; 16-bit and float images are scaled to 8 bits first) and resized to 299 px
on its own, so a set may mix sizes.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from busdiff.data.busi import sha256_file
from busdiff.evaluate.inception import FEATURE_DIM, InceptionWeights, load_inception, resolve_weights
from busdiff.storage import is_uri, local_path, read_bytes, readable, write_bytes


@dataclass(frozen=True)
class ImageItem:
    """One image of a set being evaluated: a stable id, its file, class and content hash."""

    id: str
    path: str
    label: str | None = None
    sha256: str = ""
    source: str = "real"  # "real" or "synthetic"


def with_hashes(items: Sequence[ImageItem]) -> list[ImageItem]:
    """Fill in missing sha256 values (real records carry theirs from the loader)."""
    from dataclasses import replace

    def sha(path: str) -> str:
        if not is_uri(path):
            return sha256_file(path)
        data = read_bytes(path)
        if data is None:
            raise FileNotFoundError(f"{path}: no such object")
        return hashlib.sha256(data).hexdigest()

    return [it if it.sha256 else replace(it, sha256=sha(it.path)) for it in items]


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode any image file to ``(H, W, 3)`` uint8 RGB; 16-bit / 32-bit / float modes are scaled to 8 bit.

    Raises ValueError naming the file when it cannot be decoded."""
    try:
        with Image.open(readable(path)) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.asarray(im, dtype=np.uint16) >> 8
                return np.repeat(arr.astype(np.uint8)[..., None], 3, axis=-1)
            if im.mode in ("I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                top = (
                    1.0
                    if im.mode == "F" and arr.max(initial=0) <= 1.0
                    else (255.0 if arr.max() <= 255 else 65535.0)
                )
                arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=-1)
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot decode image: {type(e).__name__}: {e}") from e


class FeatureCache:
    """Per-image feature vectors keyed by (extractor id, sha256); ``None`` root disables caching. The root
    is a local folder or a URI (one small object per image)."""

    def __init__(self, root: str | Path | None, extractor_id: str) -> None:
        if root is not None and not is_uri(root):
            root = local_path(root)
        self.dir = None if root is None else f"{str(root).rstrip('/')}/features/{extractor_id}"

    def _path(self, sha: str) -> str:
        assert self.dir is not None
        return f"{self.dir}/{sha[:2]}/{sha}.npy"

    def get(self, shas: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.dir is None:
            return out
        for s in set(shas):
            data = read_bytes(self._path(s))
            if data is None:
                continue
            try:
                v = np.load(io.BytesIO(data), allow_pickle=False)
            except (OSError, ValueError):  # a damaged entry is recomputed
                continue
            if v.shape == (FEATURE_DIM,):
                out[s] = v
        return out

    def put(self, feats: dict[str, np.ndarray]) -> None:
        if self.dir is None:
            return
        for s, v in feats.items():
            buf = io.BytesIO()
            np.save(buf, np.asarray(v, dtype=np.float32), allow_pickle=False)
            write_bytes(self._path(s), buf.getvalue())  # atomic: concurrent runs share the cache


def embed_paths(
    paths: Sequence[str], weights: InceptionWeights, device: str = "cpu", batch_size: int = 32
) -> np.ndarray:
    """Inception features ``(len(paths), 2048)`` float32 of image files, in this process."""
    if not paths:
        return np.zeros((0, FEATURE_DIM), dtype=np.float32)
    model = load_inception(weights, device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            # Resize each image on its own (sets may mix sizes), then run the network on the batch.
            pre = [
                model.preprocess(torch.from_numpy(read_rgb(p)).permute(2, 0, 1)[None].contiguous())
                for p in chunk
            ]
            x = torch.cat(pre).to(device)
            out.append(model.forward_preprocessed(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def _embed_task(
    paths: list[str],
    weights_spec: str,
    cache_dir: str,
    expect_sha: str,
    device: str,
    batch_size: int,
    threads: int,
) -> np.ndarray:
    """A Ray task: resolve the same weights on this node (converting the packaged copy if needed)."""
    torch.set_num_threads(max(1, threads))
    weights = resolve_weights(weights_spec, cache_dir, download_timeout_s=0)
    if weights.sha256 != expect_sha:
        raise RuntimeError(
            f"Inception weights on this node ({weights.path}, sha256 {weights.sha256[:12]}) differ from the "
            f"driver's ({expect_sha[:12]}): pass the same --inception-weights file on every node"
        )
    return embed_paths(paths, weights, device, batch_size)


@dataclass
class FeatureStats:
    n_images: int = 0
    n_cached: int = 0
    n_computed: int = 0
    seconds: float = 0.0
    extract_seconds: float = 0.0
    extractor_id: str = ""
    weights_source: str = ""
    per_set: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float | None:
        return self.n_computed / self.extract_seconds if self.n_computed and self.extract_seconds else None


def arithmetic_id(device: str) -> str:
    """How features are computed on ``device``: ``cpu-fp32``, ``cuda-fp32`` or ``cuda-tf32``."""
    kind = torch.device(device).type
    if kind == "cuda" and torch.backends.cudnn.allow_tf32:
        return "cuda-tf32"
    return f"{kind}-fp32"


class FeatureExtractor:
    """Features of :class:`ImageItem` lists through the cache; misses are embedded in this process
    (``workers=0``) or as Ray tasks with the given resources (the caller has connected to Ray)."""

    def __init__(
        self,
        weights: InceptionWeights,
        cache_dir: str | Path | None,
        weights_spec: str = "auto",
        device: str = "cpu",
        batch_size: int = 32,
        workers: int = 0,
        num_cpus: float = 1,
        num_gpus: float = 0,
        chunk_size: int = 64,
    ) -> None:
        self.weights = weights
        self.weights_spec = weights_spec
        self.cache_root = cache_dir
        extractor_id = f"{weights.extractor_id}-{arithmetic_id(device)}"
        self.cache = FeatureCache(cache_dir, extractor_id)
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.chunk_size = chunk_size
        self.stats = FeatureStats(extractor_id=extractor_id, weights_source=weights.source)

    def _compute(self, paths: list[str]) -> np.ndarray:
        if self.workers <= 0:
            return embed_paths(paths, self.weights, self.device, self.batch_size)
        import ray

        task = ray.remote(_embed_task).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=1)
        spec = str(self.weights.path) if self.weights_spec not in ("", "auto") else "auto"
        cache_root = str(self.cache_root) if self.cache_root is not None else str(self.weights.path.parent)
        threads = max(1, int(self.num_cpus))
        # One chunk per worker (each task loads the network once), none smaller than chunk_size images.
        n_chunks = max(1, min(self.workers, len(paths) // self.chunk_size))
        chunks = [list(c) for c in np.array_split(np.array(paths, dtype=object), n_chunks) if len(c)]
        refs = [
            task.remote(c, spec, cache_root, self.weights.sha256, self.device, self.batch_size, threads)
            for c in chunks
        ]
        return np.concatenate(ray.get(refs))

    def features_of_sets(self, sets: dict[str, Sequence[ImageItem]]) -> dict[str, np.ndarray]:
        """Features of several named sets in one pass: images missing from the cache (across all sets,
        each content once) are embedded together, so the network is loaded once. ``{name: (n, 2048)}``."""
        t0 = time.perf_counter()
        sets = {name: with_hashes(items) for name, items in sets.items()}
        shas = {name: [it.sha256 for it in items] for name, items in sets.items()}
        found = self.cache.get([s for v in shas.values() for s in v])
        todo: dict[str, str] = {}
        missing_per_set: dict[str, int] = {}
        for name, items in sets.items():
            missing_per_set[name] = sum(it.sha256 not in found for it in items)
            for it in items:
                if it.sha256 not in found and it.sha256 not in todo:
                    todo[it.sha256] = it.path
        if todo:
            t1 = time.perf_counter()
            feats = self._compute(list(todo.values()))
            self.stats.extract_seconds += time.perf_counter() - t1
            new = dict(zip(todo, feats, strict=True))
            self.cache.put(new)
            found.update(new)
        out = {
            name: np.stack([found[s] for s in v]).astype(np.float32)
            if v
            else np.zeros((0, FEATURE_DIM), np.float32)
            for name, v in shas.items()
        }
        n_items = sum(len(v) for v in shas.values())
        self.stats.n_images += n_items
        self.stats.n_computed += len(todo)
        self.stats.n_cached += n_items - sum(missing_per_set.values())
        self.stats.seconds += time.perf_counter() - t0
        for name, v in shas.items():
            self.stats.per_set[name] = {"n": len(v), "not_cached": missing_per_set[name]}
        return out

    def features(self, items: Sequence[ImageItem], name: str = "set") -> np.ndarray:
        """``(len(items), 2048)`` float32, in the order of ``items``."""
        return self.features_of_sets({name: items})[name]

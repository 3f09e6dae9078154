"""Training data: the split(s) a run trains on, decoded at the training resolution, dealt to the Ray Train
workers, and cut into seeded micro-batches.

Each worker receives a fixed shard through ``ray.train.get_dataset_shard``: row ``i`` (in id order) goes to
rank ``i % world_size``. Ray Train's default split (``streaming_split(equal=True)``) drops
``n % world_size`` rows and deals blocks in arrival order, which differs between runs; a fixed shard covers
the split exactly once and makes a resumed run reproduce the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from busdiff.data.records import ImageRecord

try:
    from ray.train import DataConfig as _DataConfig
except ImportError:  # pragma: no cover - ray[train] is a dependency
    _DataConfig = object  # type: ignore[misc,assignment]

if TYPE_CHECKING:
    import ray.data

TRAIN = "train"


def seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, step, rank, ...): neighbouring inputs give
    unrelated streams, unlike ``seed + step``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def training_items(records: list[ImageRecord]) -> list[dict[str, Any]]:
    """What travels to the workers before decoding, in id order, each with its position ``index``."""
    ordered = sorted(records, key=lambda r: r.id)
    return [
        {"index": i, "id": r.id, "label": r.label, "image_path": r.image_path} for i, r in enumerate(ordered)
    ]


def decode(image_path: str, resolution: int, center_crop: bool) -> np.ndarray:
    """The image as uint8 H×W×3, shorter side resized to ``resolution`` (bicubic, as diffusers' scripts);
    with ``center_crop`` also cut to a centred square, else the worker crops at random."""
    with Image.open(image_path) as im:
        im.load()
        image = im.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8)


def decode_row(row: dict[str, Any], resolution: int, center_crop: bool) -> dict[str, Any]:
    return {
        "id": row["id"],
        "label": row["label"],
        "image": decode(row["image_path"], resolution, center_crop),
    }


def shard_bounds(n: int, world_size: int) -> tuple[int, int]:
    """(smallest, largest) shard size when ``n`` rows are dealt round-robin to ``world_size`` workers."""
    return n // world_size, -(-n // world_size)


class RankShards(_DataConfig):
    """Ray Train DataConfig: a fixed, decoded shard per rank (rows with ``index % world_size == rank``).
    Each rank's shard is its own lazy Ray Dataset, so shards decode in parallel on the cluster."""

    def __init__(self, resolution: int, center_crop: bool) -> None:
        super().__init__(datasets_to_split="all")
        self.resolution, self.center_crop = resolution, center_crop

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        from ray.data.expressions import col

        res, crop = self.resolution, self.center_crop
        out: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for rank in range(world_size):
                shard = ds.filter(expr=(col("index") % world_size) == rank)
                shard = shard.map(lambda r: decode_row(r, res, crop))
                shard.context.enable_progress_bars = False  # one read per run: bars are noise in the log
                out[rank][name] = shard.iterator()
        return out


def collect_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """A shard's rows, materialised once and sorted by id (the arrival order is not deterministic)."""
    out = [
        {"id": str(r["id"]), "label": str(r["label"]), "image": np.asarray(r["image"], dtype=np.uint8)}
        for r in rows
    ]
    return sorted(out, key=lambda r: r["id"])


@dataclass
class EpochBatches:
    """Seeded micro-batches of one worker's rows. Micro-batch ``m`` of a phase is a pure function of
    (seed, phase, m, rank), so a resumed run picks up exactly where the checkpoint left off.

    ``per_epoch`` is the same on every rank (from the smallest shard), so all ranks step together; a rank
    with one extra row leaves a different row out of each epoch."""

    rows: list[dict[str, Any]]
    batch_size: int
    per_epoch: int  # micro-batches per epoch
    seed: int
    rank: int
    resolution: int
    random_flip: bool
    random_crop: bool

    def __post_init__(self) -> None:
        if self.per_epoch < 1:
            raise ValueError(f"{len(self.rows)} rows per worker do not fill one batch of {self.batch_size}")
        self._order: tuple[int, int, np.ndarray] | None = None

    def _epoch_order(self, phase: int, epoch: int) -> np.ndarray:
        if self._order is None or self._order[:2] != (phase, epoch):
            rng = np.random.default_rng(seed_of(self.seed, 1, phase, epoch, self.rank))
            self._order = (phase, epoch, rng.permutation(len(self.rows)))
        return self._order[2]

    def epoch_of(self, micro: int) -> int:
        return micro // self.per_epoch

    def get(self, phase: int, micro: int) -> tuple[torch.Tensor, list[str], list[str]]:
        """Micro-batch ``micro`` of phase ``phase``: images as float N×3×H×W in [-1, 1], labels, ids."""
        epoch, k = divmod(micro, self.per_epoch)
        idx = self._epoch_order(phase, epoch)[k * self.batch_size : (k + 1) * self.batch_size]
        rng = np.random.default_rng(seed_of(self.seed, 2, phase, micro, self.rank))
        images = [self._augment(self.rows[i]["image"], rng) for i in idx]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return x, [self.rows[i]["label"] for i in idx], [self.rows[i]["id"] for i in idx]

    def _augment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        r = self.resolution
        h, w = image.shape[:2]
        top = int(rng.integers(0, h - r + 1)) if self.random_crop else (h - r) // 2
        left = int(rng.integers(0, w - r + 1)) if self.random_crop else (w - r) // 2
        image = image[top : top + r, left : left + r]
        if self.random_flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)

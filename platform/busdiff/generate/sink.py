"""The generation sink: a directory (local path or pyarrow filesystem URI) that a rerun resumes.

```
OUT/
  config.yaml                      the resolved config of the last run
  plan.json                        plan name, recipe and its hash (one recipe per sink), counts, versions
  samples/<class>/<id>.png         the final images (refined, or text2img when refine is off)
  samples/metadata.parquet         one row per image in samples/ (file_name relative to samples/)
  text2img/<class>/<id>.png        the text2img images before refinement (generate.keep_text2img)
  masks/<class>/<id>.png           with generate.controlnet: each image's conditioning mask, as used
  metadata/parts/<key>.parquet     the journal: one file per written batch, named by the batch's ids
  summary.json                     the last run's counts and images/s per stage
```

``samples/`` is what torchvision's ``ImageFolder`` reads (one folder per class) and what
``datasets.load_dataset("imagefolder", data_dir=OUT/samples)`` reads with the metadata columns.
Every file is written atomically (:func:`busdiff.storage.write_bytes`) under a deterministic name; within
a batch the PNGs are written before the journal part, so an id counts as written only when its journal
row exists and its PNG has the size the row records (rows of journals older than that column: when the PNG
decodes). A batch written twice (a retry after a lost actor) rewrites the same
part; rows are de-duplicated by id on read (the latest write wins), so a rerun never duplicates a row.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from busdiff.provenance import package_versions
from busdiff.storage import filesystem_for, is_uri, write_bytes

SAMPLES = "samples"
TEXT2IMG = "text2img"
MASKS = "masks"
PARTS = "metadata/parts"
METADATA = "metadata.parquet"  # inside samples/, where `imagefolder` looks for it

#: Columns of every metadata row, in order (the imagefolder loader needs the same schema in every file).
SCHEMA = pa.schema(
    [
        ("file_name", pa.string()),  # relative to samples/: <class>/<id>.png
        ("id", pa.string()),
        ("class", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),  # text2img; -1 when the image is a refined real one
        ("refine_seed", pa.int64()),  # img2img; -1 when refine is off
        ("source", pa.string()),  # the real image refined ("" for text2img)
        ("text2img_path", pa.string()),  # relative to OUT ("" unless keep_text2img)
        ("png_bytes", pa.int64()),  # size of the PNG in samples/: a resume checks it against a listing
        ("text2img_png_bytes", pa.int64()),  # size of the text2img PNG (0 unless keep_text2img)
        ("scheduler", pa.string()),
        ("steps", pa.int64()),
        ("guidance", pa.float64()),
        ("strength", pa.float64()),  # 0 when refine is off
        ("refine_steps", pa.int64()),
        ("refine_guidance", pa.float64()),
        ("handoff", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("base_model", pa.string()),
        ("adapter_hash", pa.string()),
        ("plan", pa.string()),
        ("recipe_hash", pa.string()),
        ("packages", pa.string()),  # JSON {package: version} of the process that wrote the row
        ("text2img_seconds", pa.float64()),
        ("img2img_seconds", pa.float64()),
        ("text2img_worker", pa.string()),  # host:pid of the actor that ran the stage ("" when none)
        ("img2img_worker", pa.string()),
        ("written_at", pa.string()),  # UTC ISO time; the latest wins when an id was written twice
        # generate.controlnet ("" / 0 without): the mask used, the train image it came from, its transform
        ("mask_path", pa.string()),  # relative to OUT: masks/<class>/<id>.png
        ("mask_png_bytes", pa.int64()),
        ("condition_id", pa.string()),  # "" for an empty mask
        ("mask_transform", pa.string()),  # JSON (busdiff.generate.masks)
        ("controlnet", pa.string()),  # the ControlNet's id; "" when the row was generated without it
    ]
)


class Sink:
    """The files of one generation output directory ``out`` (a local path or a filesystem URI)."""

    def __init__(self, out: str | Path) -> None:
        out = str(out)
        if is_uri(out):
            self.fs, self.root = filesystem_for(out)
            self.out = out.rstrip("/")
        else:
            self.fs = pafs.LocalFileSystem()
            self.out = self.root = str(Path(out.removeprefix("file://")).expanduser().resolve())
        self.root = self.root.rstrip("/")

    # -- names -----------------------------------------------------------------------------------------
    def url(self, rel: str) -> str:
        """``rel`` as a path or URI that :func:`busdiff.storage.write_bytes` takes."""
        return f"{self.out}/{rel}"

    def _inner(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    @staticmethod
    def image_name(label: str, image_id: str) -> str:
        """File name relative to ``samples/`` (and ``text2img/``)."""
        return f"{label}/{image_id}.png"

    @staticmethod
    def part_name(ids: Iterable[str]) -> str:
        ids = sorted(ids)
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
        return f"{PARTS}/{ids[0]}_{digest}.parquet"

    # -- reading ---------------------------------------------------------------------------------------
    def _list(self, rel: str) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self._inner(rel), recursive=True, allow_not_found=True)
        return [f for f in self.fs.get_file_info(sel) if f.type == pafs.FileType.File]

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._inner(rel)) as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._inner(rel)).type == pafs.FileType.File

    def read_metadata(self) -> pa.Table:
        """Every journal row, one per id (the latest ``written_at``), sorted by (class, id)."""
        return _dedup(self.read_journal())

    def read_journal(self) -> pa.Table:
        """Every journal row as written, duplicates included (a batch written twice shows up twice)."""
        parts = sorted(
            f.path
            for f in self._list(PARTS)
            if f.base_name.endswith(".parquet") and not f.base_name.startswith(".")
        )
        if not parts:
            return SCHEMA.empty_table()
        return pa.concat_tables([_conform(pq.read_table(p, filesystem=self.fs)) for p in parts])

    def _decodes(self, rel: str) -> bool:
        try:
            with Image.open(io.BytesIO(self.read_bytes(rel))) as im:
                im.load()
            return True
        except Exception:  # missing, truncated, not a PNG: not written
            return False

    def written_ids(self, want: Iterable[str] | None = None, keep_text2img: bool = False) -> set[str]:
        """Ids whose journal row exists and whose PNG (and text2img PNG with ``keep_text2img``) is there
        with the size the row records, as one listing shows it (a truncated file is not written); rows
        that record no size (older journals) count when their PNG decodes. Only ids in ``want`` when
        given. Reads no image of a current journal: a resume of tens of thousands of images is a listing
        and the journal."""
        meta = self.read_metadata()
        want = None if want is None else set(want)
        columns = ["id", "file_name", "png_bytes", "text2img_path", "text2img_png_bytes", "mask_path",
                   "mask_png_bytes"]
        todo = []  # (id, [(rel, recorded size)]) of every wanted row
        for i, name, size, t2i, t2i_size, mask, mask_size in zip(*(meta[c].to_pylist() for c in columns),
                                                                  strict=True):
            if want is None or i in want:
                extra = [(t2i or "-", t2i_size)] if keep_text2img else []
                extra += [(mask, mask_size)] if mask else []
                todo.append((i, [(f"{SAMPLES}/{name}", size), *extra]))
        present = {f.path: f.size for d in (SAMPLES, TEXT2IMG, MASKS) for f in self._list(d)}

        def ok(files: list[tuple[str, int]]) -> bool:
            sizes = [present.get(self._inner(rel)) for rel, _ in files]
            return all(
                size is not None and (size == recorded if recorded > 0 else self._decodes(rel))
                for (rel, recorded), size in zip(files, sizes, strict=True)
            )

        unsized = [(i, f) for i, f in todo if any(recorded <= 0 for _, recorded in f)]
        with ThreadPoolExecutor(8) as pool:  # reads and decodes, for rows that record no size only
            decoded = {i for (i, _), good in zip(unsized, pool.map(ok, (f for _, f in unsized)), strict=True)
                       if good}
        unsized_ids = {i for i, _ in unsized}
        return decoded | {i for i, f in todo if i not in unsized_ids and ok(f)}

    # -- writing ---------------------------------------------------------------------------------------
    def write_png(self, rel: str, image: np.ndarray) -> int:
        """Writes the PNG; returns its size in bytes."""
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
        write_bytes(self.url(rel), buf.getvalue())
        return buf.getbuffer().nbytes

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        write_bytes(self.url(rel), buf.getvalue().to_pybytes())

    def write_if_changed(self, rel: str, data: bytes) -> bool:
        """Write ``data`` unless the file already holds it (a complete rerun rewrites nothing)."""
        if self.exists(rel) and self.read_bytes(rel) == data:
            return False
        write_bytes(self.url(rel), data)
        return True

    def consolidate(self) -> str:
        """Rewrite ``samples/metadata.parquet``: one row per journal id whose PNG exists."""
        meta = self.read_metadata()
        present = {f.path for f in self._list(SAMPLES)}
        keep = pa.array(
            [self._inner(f"{SAMPLES}/{n}") in present for n in meta["file_name"].to_pylist()], type=pa.bool_()
        )
        rel = f"{SAMPLES}/{METADATA}"
        buf = pa.BufferOutputStream()
        pq.write_table(meta.filter(keep), buf)
        self.write_if_changed(rel, buf.getvalue().to_pybytes())
        return self.url(rel)

    def remove_stale_temp_files(self) -> int:
        """Delete temporary files a killed writer left behind (local sinks; object stores have none)."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            return 0
        n = 0
        for d in (SAMPLES, TEXT2IMG, MASKS, PARTS):
            for f in self._list(d):
                if f.base_name.startswith(".") and f.base_name.endswith(".tmp"):
                    Path(f.path).unlink(missing_ok=True)
                    n += 1
        return n


def _conform(table: pa.Table) -> pa.Table:
    """A journal part in SCHEMA; columns added since the part was written are filled with empty values."""
    for f in SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type).fill_null(
                "" if pa.types.is_string(f.type) else 0))
    return table.select(SCHEMA.names).cast(SCHEMA)


def _dedup(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("id", "ascending"), ("written_at", "descending")])
    table = table.take(order)
    ids = table["id"].to_pylist()
    first = [i == 0 or ids[i] != ids[i - 1] for i in range(len(ids))]
    table = table.filter(pa.array(first, type=pa.bool_()))
    return table.take(pc.sort_indices(table, sort_keys=[("class", "ascending"), ("id", "ascending")]))


def write_batch(
    batch: dict[str, np.ndarray], out: str, static: dict[str, Any], keep_text2img: bool
) -> dict[str, np.ndarray]:
    """Ray Data stage: write a batch's PNGs, then its journal part; return small rows for the summary.

    ``static`` holds the per-run provenance columns (scheduler, steps, base model, ...)."""
    sink = Sink(out)
    t0 = time.time()
    ids = [str(i) for i in batch["id"]]
    labels = [str(c) for c in batch["label"]]
    final = batch["refined"] if "refined" in batch else batch["t2i"]
    n = len(ids)
    t2i_paths, t2i_bytes, png_bytes = [""] * n, [0] * n, [0] * n
    mask_paths, mask_bytes = [""] * n, [0] * n
    controlled = batch.get("controlled", np.zeros(n, bool))
    for k, (i, c) in enumerate(zip(ids, labels, strict=True)):
        if keep_text2img:
            t2i_paths[k] = f"{TEXT2IMG}/{Sink.image_name(c, i)}"
            t2i_bytes[k] = sink.write_png(t2i_paths[k], batch["t2i"][k])
        png_bytes[k] = sink.write_png(f"{SAMPLES}/{Sink.image_name(c, i)}", final[k])
        if "mask" in batch:
            mask_paths[k] = f"{MASKS}/{Sink.image_name(c, i)}"
            mask_bytes[k] = sink.write_png(mask_paths[k], batch["mask"][k])
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    zeros = np.zeros(n)
    columns = {
        "file_name": [Sink.image_name(c, i) for i, c in zip(ids, labels, strict=True)],
        "id": ids,
        "class": labels,
        "prompt": [str(p) for p in batch["prompt"]],
        "negative_prompt": [str(p) for p in batch["negative_prompt"]],
        "seed": [int(s) for s in batch["seed"]],
        "refine_seed": [int(s) for s in batch["refine_seed"]],
        "source": [str(s) for s in batch["source"]],
        "text2img_path": t2i_paths,
        "png_bytes": png_bytes,
        "text2img_png_bytes": t2i_bytes,
        **{
            k: [static[k]] * n
            for k in (
                "scheduler",
                "steps",
                "guidance",
                "strength",
                "refine_steps",
                "refine_guidance",
                "handoff",
                "base_model",
                "adapter_hash",
                "plan",
                "recipe_hash",
            )
        },
        "width": [int(final.shape[2])] * n,
        "height": [int(final.shape[1])] * n,
        "packages": [json.dumps(package_versions(), sort_keys=True)] * n,
        "text2img_seconds": [float(x) for x in batch.get("t2i_s", zeros)],
        "img2img_seconds": [float(x) for x in batch.get("img2img_s", zeros)],
        "text2img_worker": [str(w) for w in batch.get("t2i_worker", [""] * n)],
        "img2img_worker": [str(w) for w in batch.get("img2img_worker", [""] * n)],
        "written_at": [now] * n,
        "mask_path": mask_paths,
        "mask_png_bytes": mask_bytes,
        "condition_id": [str(x) for x in batch.get("condition_id", [""] * n)],
        "mask_transform": [str(x) for x in batch.get("mask_transform", [""] * n)],
        "controlnet": [static.get("controlnet", "") if on else "" for on in controlled],
    }
    sink.write_table(Sink.part_name(ids), pa.table(columns, schema=SCHEMA))
    t1 = time.time()
    summary = {
        "id": np.array(ids),
        "label": np.array(labels),
        "write_t0": np.full(n, t0),
        "write_t1": np.full(n, t1),
    }
    for stage in ("t2i", "img2img"):
        for k in ("_t0", "_t1"):
            if stage + k in batch:
                summary[stage + k] = np.asarray(batch[stage + k])
    return summary

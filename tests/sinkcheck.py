"""What every generation test that loses something midway (an actor, the driver, a node) checks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from busdiff.generate.plan import build_plan
from busdiff.generate.sink import SAMPLES, Sink


def pngs(out: Path) -> list[Path]:
    return sorted((out / SAMPLES).rglob("*.png"))


def assert_exactly_the_plan(out: Path, cfg) -> None:
    """The sink at ``out`` holds exactly ``cfg``'s plan: every planned PNG once and decodable, one
    metadata row per image, one journal row per id as written (no image made twice), no temp file."""
    plan_ids = sorted(build_plan(cfg).ids)
    files = pngs(out)
    assert sorted(p.stem for p in files) == plan_ids  # none missing, none extra
    for p in files:
        with Image.open(p) as im:
            im.load()  # every PNG decodes
    meta = pq.read_table(out / SAMPLES / "metadata.parquet")
    assert sorted(meta["id"].to_pylist()) == plan_ids  # one row per image, no duplicate
    # the journal as written, before any de-duplication: no image was made (and written) twice
    journal = Counter(Sink(out).read_journal()["id"].to_pylist())
    assert sorted(journal) == plan_ids and set(journal.values()) == {1}, journal.most_common(3)
    assert not [p for p in out.rglob("*.tmp")]  # no half-written file left

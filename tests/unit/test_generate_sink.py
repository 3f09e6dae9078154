"""The generation sink without Ray: PNG + parquet journal, what counts as written, no duplicate rows, and a
layout torchvision's ImageFolder (and `datasets`' imagefolder) reads as it is."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from busdiff.generate.sink import METADATA, PARTS, SAMPLES, SCHEMA, Sink, write_batch

STATIC = {
    "scheduler": "DPMSolverMultistep",
    "steps": 4,
    "guidance": 7.5,
    "strength": 0.3,
    "refine_steps": 4,
    "refine_guidance": 7.5,
    "handoff": "image",
    "base_model": "tiny",
    "adapter_hash": "",
    "plan": "syn",
    "recipe_hash": "r1",
}


def _batch(labels: list[str], start: int = 0, value: int = 0) -> dict[str, np.ndarray]:
    n = len(labels)
    ids = [f"syn-{c}-{start + k:05d}" for k, c in enumerate(labels)]
    rng = np.random.default_rng(start + value)
    return {
        "id": np.array(ids),
        "label": np.array(labels),
        "prompt": np.array([f"an ultrasound image of {c}" for c in labels]),
        "negative_prompt": np.array([""] * n),
        "seed": np.arange(start, start + n),
        "refine_seed": 4000 + np.arange(start, start + n),
        "source": np.array([""] * n),
        "t2i": rng.integers(0, 255, (n, 16, 24, 3), dtype=np.uint8),
        "refined": rng.integers(0, 255, (n, 16, 24, 3), dtype=np.uint8),
        "t2i_s": np.full(n, 0.5),
        "img2img_s": np.full(n, 0.25),
    }


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_batches_land_as_pngs_and_journal_rows(tmp_path, scheme):
    out = f"{scheme}{tmp_path}/gen"
    b = _batch(["benign", "malignant", "benign"])
    summary = write_batch(b, out, STATIC, keep_text2img=True)
    assert list(summary["id"]) == list(b["id"])
    png = tmp_path / "gen" / SAMPLES / "benign" / "syn-benign-00000.png"
    np.testing.assert_array_equal(np.asarray(Image.open(png)), b["refined"][0])
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "gen" / "text2img" / "malignant" / "syn-malignant-00001.png")),
        b["t2i"][1],
    )
    sink = Sink(out)
    meta = sink.read_metadata()
    assert meta.schema == SCHEMA and meta.num_rows == 3
    row = meta.to_pylist()[0]
    assert (row["id"], row["class"], row["file_name"]) == (
        "syn-benign-00000",
        "benign",
        "benign/syn-benign-00000.png",
    )
    assert (row["width"], row["height"], row["seed"], row["refine_seed"]) == (24, 16, 0, 4000)
    assert row["text2img_seconds"] == 0.5 and row["recipe_hash"] == "r1"
    assert json.loads(row["packages"])["diffusers"].count(".") >= 1
    assert sink.written_ids() == set(b["id"])
    assert sink.written_ids(["syn-benign-00000", "other"], keep_text2img=True) == {"syn-benign-00000"}


def test_a_batch_written_twice_gives_one_row_per_id(tmp_path):
    out = str(tmp_path / "gen")
    b = _batch(["normal", "normal"])
    write_batch(b, out, STATIC, keep_text2img=False)
    write_batch(b, out, STATIC, keep_text2img=False)  # a retried batch rewrites the same part
    assert len(list((tmp_path / "gen" / PARTS).iterdir())) == 1
    # a rerun that regenerates one id in another batch adds a second row for it on disk ...
    again = {k: v[1:] for k, v in _batch(["normal", "normal"], value=1).items()}
    write_batch(again, out, STATIC, keep_text2img=False)
    raw = sum(pq.read_table(p).num_rows for p in (tmp_path / "gen" / PARTS).iterdir())
    assert raw == 3
    # ... but reading keeps the latest row of each id, and the consolidated metadata has no duplicate
    sink = Sink(out)
    assert sink.read_metadata()["id"].to_pylist() == ["syn-normal-00000", "syn-normal-00001"]
    table = pq.read_table(sink.consolidate())
    assert sorted(table["id"].to_pylist()) == ["syn-normal-00000", "syn-normal-00001"]


def test_only_decodable_pngs_with_a_journal_row_count_as_written(tmp_path):
    out = str(tmp_path / "gen")
    write_batch(_batch(["benign", "malignant"]), out, STATIC, keep_text2img=False)
    write_batch(_batch(["normal"], start=5), out, STATIC, keep_text2img=False)
    sink = Sink(out)
    assert len(sink.written_ids()) == 3
    png = tmp_path / "gen" / SAMPLES / "benign" / "syn-benign-00000.png"
    png.write_bytes(png.read_bytes()[:40])  # truncated: must be made again
    for part in (tmp_path / "gen" / PARTS).glob("syn-normal-*"):
        part.unlink()  # a PNG whose journal part never got written (killed in between)
    assert sink.written_ids() == {"syn-malignant-00001"}
    # keep_text2img: the text2img PNG is part of being written
    assert sink.written_ids(keep_text2img=True) == set()


def test_a_resume_checks_sizes_from_one_listing_and_decodes_only_rows_without_one(tmp_path, monkeypatch):
    out = str(tmp_path / "gen")
    write_batch(_batch(["benign", "malignant"]), out, STATIC, keep_text2img=True)
    sink = Sink(out)
    assert set(sink.read_metadata()["png_bytes"].to_pylist()) != {0}
    decoded = []
    real_decodes = Sink._decodes
    monkeypatch.setattr(Sink, "_decodes", lambda self, rel: decoded.append(rel) or real_decodes(self, rel))
    assert sink.written_ids(keep_text2img=True) == {"syn-benign-00000", "syn-malignant-00001"}
    assert decoded == []  # a current journal: no image read
    # a journal part written before the size columns existed: its rows are checked by decoding
    old = next((tmp_path / "gen" / PARTS).iterdir())
    pq.write_table(pq.read_table(old).drop_columns(["png_bytes", "text2img_png_bytes"]), old)
    assert sink.written_ids() == {"syn-benign-00000", "syn-malignant-00001"}
    assert sorted(decoded) == [f"{SAMPLES}/benign/syn-benign-00000.png",
                               f"{SAMPLES}/malignant/syn-malignant-00001.png"]


def test_the_layout_is_an_image_folder_with_imagefolder_metadata(tmp_path):
    from torchvision.datasets import ImageFolder

    out = str(tmp_path / "gen")
    write_batch(_batch(["benign", "malignant", "normal", "benign"]), out, STATIC, keep_text2img=False)
    # a temporary file a killed writer left behind is neither an image nor kept
    stale = tmp_path / "gen" / SAMPLES / "benign" / ".syn-benign-00009.png.abc.tmp"
    stale.write_bytes(b"half")
    sink = Sink(out)
    assert sink.remove_stale_temp_files() == 1 and not stale.exists()
    meta_path = sink.consolidate()
    folder = ImageFolder(str(tmp_path / "gen" / SAMPLES))
    assert folder.classes == ["benign", "malignant", "normal"]
    assert len(folder) == 4
    names = {p.rsplit("/", 1)[1]: folder.classes[t] for p, t in folder.samples}
    assert names["syn-normal-00002.png"] == "normal" and names["syn-benign-00003.png"] == "benign"
    # datasets' imagefolder reads samples/metadata.parquet: file_name relative to it, one row per image
    assert meta_path.endswith(f"{SAMPLES}/{METADATA}")
    table = pq.read_table(meta_path)
    for row in table.to_pylist():
        assert (tmp_path / "gen" / SAMPLES / row["file_name"]).is_file()
        assert row["file_name"].split("/")[0] == row["class"]
    assert not [c for c in table.column_names if c.endswith("_file_name")]  # only file_name is an image

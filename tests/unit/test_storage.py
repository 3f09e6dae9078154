from __future__ import annotations

from pathlib import Path

import pytest

from busdiff import storage


def test_write_creates_parents_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "report.json"
    storage.write_text(target, "{}")
    assert target.read_text() == "{}"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    storage.write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError):
        storage.write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_file_uri_is_local(tmp_path):
    out = storage.write_bytes(f"file://{tmp_path}/x/y.bin", b"abc")
    assert Path(out).read_bytes() == b"abc"


def test_filesystem_uri_goes_through_pyarrow(monkeypatch):
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri("mock:///")  # Arrow's in-memory filesystem, shared across calls
    monkeypatch.setattr(storage, "filesystem_for", lambda uri: (fs, uri.split("://")[1]))
    storage.write_text("s3://bucket/runs/report.json", "hello")
    with fs.open_input_stream("bucket/runs/report.json") as f:
        assert f.read() == b"hello"

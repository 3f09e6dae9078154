"""Outputs on local disk or any pyarrow filesystem URI (s3://, gs://), written so that a crash never
leaves a half-written file: local writes go to a temporary name and are renamed into place; object
stores only publish an object when its upload completes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` (s3://, gs://, hdfs://, ...) and the path inside it."""
    return pafs.FileSystem.from_uri(uri)


def write_bytes(path: str | Path, data: bytes) -> str:
    """Write ``data`` to a local path or a filesystem URI atomically; returns the path written."""
    path = str(path)
    if _is_uri(path):
        fs, inner = filesystem_for(path)
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(inner) as f:
            f.write(data)
        return path
    path = path.removeprefix("file://")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be read by others
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)


def write_text(path: str | Path, text: str) -> str:
    return write_bytes(path, text.encode())

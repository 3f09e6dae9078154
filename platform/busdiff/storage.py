"""Files on local disk or any pyarrow filesystem URI (s3://, gs://): read, listed, and written so that a
crash never leaves a half-written file: local writes go to a temporary name and are renamed into place;
object stores only publish an object when its upload completes."""

from __future__ import annotations

import functools
import io
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str | Path) -> bool:
    """A filesystem URI (s3://...), not a local path (``file://`` counts as local)."""
    path = str(path)
    return "://" in path and not path.startswith("file://")


def local_path(path: str | Path) -> Path:
    """A local path or ``file://`` URI as a Path, ``~`` expanded."""
    return Path(str(path).removeprefix("file://")).expanduser()


def absolute(path: str | Path) -> str:
    """What every node reads as the same place: a URI as given (no trailing slash), a local path resolved."""
    return str(path).rstrip("/") if is_uri(path) else str(local_path(path).resolve())


def read_bytes(path: str | Path) -> bytes | None:
    """The file's bytes, or None when there is no file there."""
    if not is_uri(path):
        p = local_path(path)
        return p.read_bytes() if p.is_file() else None
    fs, inner = filesystem_for(str(path))
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError:
        return None


def readable(path: str | Path) -> str | io.BytesIO:
    """What ``PIL.Image.open`` or ``np.load`` takes for ``path``: a local path as it is, a URI's bytes in
    memory (FileNotFoundError when there is no such object)."""
    if not is_uri(path):
        return str(local_path(path))
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(f"{path}: no such object")
    return io.BytesIO(data)


def list_dir(path: str | Path) -> tuple[list[str], list[str]] | None:
    """``(files, folders)``: the sorted names directly in the folder ``path`` (on an object store, the
    keys and common prefixes under ``path/``), or None when there is no such folder."""
    if not is_uri(path):
        p = local_path(path)
        if not p.is_dir():
            return None
        entries = list(p.iterdir())
        return sorted(e.name for e in entries if e.is_file()), sorted(e.name for e in entries if e.is_dir())
    fs, inner = filesystem_for(str(path))
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    if not infos:
        return None  # an object store has no empty folders
    files = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    return files, sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` (s3://, gs://, hdfs://, ...) and the path inside it.

    S3 filesystems are made once per bucket and AWS environment (making one resolves the bucket's region:
    a request), and with ``allow_delayed_open``: an object smaller than one upload part (every PNG,
    parquet part and JSON busdiff writes) is then one PutObject instead of a three-request multipart
    upload."""
    if uri.startswith("s3://"):
        rest, _, query = uri.removeprefix("s3://").partition("?")
        bucket, _, key = rest.partition("/")
        if "allow_delayed_open" not in query:
            query = "&".join(q for q in (query, "allow_delayed_open=true") if q)
        fs = _s3_filesystem(bucket, query, tuple(os.environ.get(k) for k in _AWS_ENV))
        return fs, f"{bucket}/{key}".rstrip("/")
    return pafs.FileSystem.from_uri(uri)


#: What the AWS SDK reads from the environment: a cached filesystem is only reused while these hold.
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION")


@functools.lru_cache(maxsize=64)
def _s3_filesystem(bucket: str, query: str, env: tuple[str | None, ...]) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"s3://{bucket}?{query}")[0]


def _has_directories(fs: pafs.FileSystem) -> bool:
    """Object stores have none: creating one writes marker objects (a request per level per file)."""
    return fs.type_name not in ("s3", "gcs")


#: Arrow's S3 error codes (in its OSError text) that mean the credentials were not accepted.
_REFUSED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN")


def check_output_uri(field: str, uri: str) -> None:
    """Refuse an object-store output (``s3://bucket/...``) before any work when its bucket does not exist,
    the credentials are refused, or the endpoint cannot be reached: one OSError line naming ``field`` and
    ``uri``. Local paths pass (their folders are created when written)."""
    if not is_uri(uri):
        return
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
    try:
        fs, inner = filesystem_for(uri)
        bucket = inner.split("/", 1)[0]
        info = fs.get_file_info(bucket)
    except (OSError, ValueError) as e:
        text = str(e)
        if any(code in text for code in _REFUSED):
            why = ("the credentials were refused (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                   "the node's instance profile)")
        elif "NETWORK_CONNECTION" in text or "Could not connect" in text:
            why = f"the object store at {endpoint} cannot be reached"
        else:
            why = text.splitlines()[0] if text else type(e).__name__
        raise OSError(f"{field}={uri}: {why}") from None
    if info.type == pafs.FileType.NotFound:
        raise OSError(f"{field}={uri}: bucket {bucket!r} does not exist at {endpoint}: create it, or choose "
                      "another bucket")


def write_bytes(path: str | Path, data: bytes) -> str:
    """Write ``data`` to a local path or a filesystem URI atomically; returns the path written."""
    path = str(path)
    if is_uri(path):
        fs, inner = filesystem_for(path)
        if _has_directories(fs):
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

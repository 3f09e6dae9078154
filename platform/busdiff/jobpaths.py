"""A command's path fields, checked before any work, naming the field: relative paths under ``ray job
submit``, and object-store outputs that cannot be written (:func:`busdiff.storage.check_output_uri`).

A submitted job runs in a temporary copy of ``--working-dir`` that Ray deletes with the job, so a
relative output (``generate.out: runs/generate-tiny``) "succeeds" and its images vanish with the copy,
and a relative input that was not uploaded with the working dir is simply not there. Locally a relative
path means the current directory, as everywhere.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from busdiff.config import BusdiffConfig, ConfigError
from busdiff.storage import check_output_uri

#: Set by Ray's job supervisor in the environment of every submitted job's entrypoint.
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

#: The path fields each command reads (input) or writes (output). Caches are outputs: a cache in the
#: temporary copy is recomputed by every job.
_FIELDS: dict[str, tuple[tuple[str, bool], ...]] = {
    "finetune": (("data.root", False), ("finetune.out", True)),
    "generate": (("generate.out", True), ("generate.adapters", False), ("generate.source", False)),
    "evaluate": (
        ("data.root", False), ("evaluate.synthetic", False), ("evaluate.adapters", False),
        ("evaluate.out", True), ("evaluate.fid.cache_dir", True), ("evaluate.fid.inception_weights", False),
    ),
    "study": (("data.root", False), ("study.out", True), ("evaluate.fid.cache_dir", True),
              ("evaluate.fid.inception_weights", False)),
    "serve": (("serve.adapters", False),),
}


def under_ray_job() -> bool:
    """True inside the entrypoint of a job submitted with ``ray job submit``."""
    return JOB_ENV in os.environ


def check_job_path(field: str, value: str | None, *, output: bool) -> None:
    """Refuse a relative ``value`` of ``field`` under a Ray job: always for an output, and for an input
    that is not in the job's working dir. URIs (s3://...) and absolute paths pass; so does anything
    outside a job."""
    local = value.removeprefix("file://") if value else value
    if not local or not under_ray_job() or "://" in local or local == "auto":
        return
    path = Path(local).expanduser()
    if path.is_absolute() or (not output and path.exists()):  # an input uploaded with --working-dir is
        return  # there for the job's lifetime
    example = f"--set {field}=/shared/busdiff/..." if "." in field else f"{field} /shared/busdiff/..."
    why = (
        "what it writes there is deleted with that copy when the job ends"
        if output
        else f"{value!r} is not in that copy"
    )
    raise ConfigError(
        f"{field}={value!r} is a relative path, and this runs as a Ray job: the job runs in a temporary "
        f"copy of --working-dir, and {why}. Give an absolute path on storage every node sees, or an "
        f"s3:// URI: {example}"
    )


def _get(cfg: BusdiffConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_job_paths(cfg: BusdiffConfig, command: str) -> None:
    """:func:`check_job_path` for every path field ``command`` uses (see ``_FIELDS``), including the base
    model's folder (``model.preset: pretrained``) and the miniature base's cache (``miniature``)."""
    fields = list(_FIELDS.get(command, ()))
    if cfg.model.preset == "pretrained" and cfg.model.base.startswith("."):
        fields.append(("model.base", False))  # a local folder; "org/name" is a hub id
    if cfg.model.preset == "miniature":
        fields.append(("model.miniature.cache_dir", True))
    if command == "study" and cfg.study.phantom_data:
        fields = [(f, out or f == "data.root") for f, out in fields]  # the demo writes its phantoms there
    for field, output in fields:
        value = _get(cfg, field)
        for v in value if isinstance(value, list) else [value]:
            check_job_path(field, v, output=output)


def check_object_store_outputs(cfg: BusdiffConfig, command: str) -> None:
    """:func:`check_output_uri` for every output path field ``command`` writes (see ``_FIELDS``): a bucket
    that is missing or refuses the credentials is found before any work, not at the first write."""
    for field, output in _FIELDS.get(command, ()):
        value = _get(cfg, field)
        if output and isinstance(value, str):
            check_output_uri(field, value)


def check_node_local_outputs(
    cfg: BusdiffConfig, command: str, nodes: list[dict[str, Any]], here: str
) -> None:
    """Refuse an output of ``command`` on this machine's own disk (a relative path, or one under /tmp) when
    the cluster has alive nodes on other hosts (``nodes``: ``ray.nodes()``; ``here``: this node's IP):
    their workers would write to their own disks, and the files would be found missing only at the end.
    URIs and other absolute paths (maybe a shared mount: that cannot be told from here) pass."""
    others = sorted({n["NodeManagerAddress"] for n in nodes if n.get("Alive")} - {here})
    if not others:
        return
    tmp = [Path(tempfile.gettempdir()).resolve(), Path("/tmp").resolve()]
    for field, output in _FIELDS.get(command, ()):
        value = _get(cfg, field)
        if not output or not isinstance(value, str) or "://" in value.removeprefix("file://"):
            continue
        path = Path(value.removeprefix("file://")).expanduser()
        if path.is_absolute() and not any(path.resolve().is_relative_to(t) for t in tmp):
            continue
        where = "a relative path" if not path.is_absolute() else "under /tmp"
        raise ConfigError(
            f"{field}={value!r} is {where}, on this machine's own disk, but the cluster has nodes on "
            f"{len(others)} other host(s) ({', '.join(others[:3])}) whose workers would write to their own "
            f"disks: give an s3:// URI or a path on storage every node mounts (--set {field}=s3://BUCKET/...)"
        )

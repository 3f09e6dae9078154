"""The run directory ``finetune.out`` (a local path or a pyarrow filesystem URI such as s3://): Ray Train's
checkpoints live in it beside busdiff's own files:

    config.yaml            the resolved config
    run.json               status, training fingerprint, package versions, result
    inputs.json            id, class, split and sha256 of every training image
    metrics.jsonl          one line per log step (loss, lr, samples/s)
    validation/step_NNNNNN.png
    workers/rank-R.json    pid, host, device, the step it resumed from, its shard's ids, the sha256 of its
                           trainable tensors at its start and (when finished) at the end
    checkpoint_NNNNNN/     Ray Train checkpoints (adapter/, trainable.safetensors, learner.pt, state.json)
    adapters/              the final adapter (pytorch_lora_weights.safetensors, learned_embeds*.safetensors,
                           adapter.json)
    adapters-lora/         lora-then-ti only: the LoRA phase's adapter alone (no TI token)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from busdiff.config import BusdiffConfig, dump_config
from busdiff.storage import filesystem_for, is_uri, read_bytes, write_text

LORA_PHASE_ADAPTERS = "adapters-lora"


def resolve_out(out: str) -> str:
    """A local run directory as an absolute path (Ray Train needs one); URIs unchanged."""
    return out.rstrip("/") if is_uri(out) else str(Path(out.removeprefix("file://")).expanduser().resolve())


def storage_and_name(out: str) -> tuple[str, str]:
    """``RunConfig(storage_path, name)`` whose experiment directory is ``out`` itself."""
    out = resolve_out(out)
    parent, _, name = out.rpartition("/")
    if not name or not parent or parent.endswith(":/"):
        raise ValueError(f"finetune.out={out!r}: give a directory below a parent, e.g. runs/finetune")
    return parent, name


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    data = read_bytes(path)
    return None if data is None else data.decode()


def publish_dir(local_dir: Path, dest: str) -> None:
    """Copy a finished local directory to a URI destination (object stores publish each file whole)."""
    fs, inner = filesystem_for(dest)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(str(local_dir), inner, destination_filesystem=fs)


def local_staging(out: str, name: str) -> tuple[Path, bool]:
    """Where to write a directory that ends up at ``out/name``: in place for a local run directory, else
    a temporary directory to publish (second value True)."""
    if is_uri(out):
        return Path(tempfile.mkdtemp(prefix=f"busdiff-{name}-")), True
    return Path(join(out, name)), False


# Fields that may change between a run and its resumption: they do not change what is trained.
_RESUMABLE = {
    "out",
    "cache_latents",  # the same training either way (the latent is sampled anew each step)
    "checkpoint_every",
    "keep_checkpoints",
    "max_failures",
    "log_every",
    "report_every",
    "validation",
    "scaling",  # except num_workers (fingerprint keeps it): it decides the shards and the batch
}


def fingerprint(cfg: BusdiffConfig) -> dict[str, Any]:
    """The config fields that decide the trained weights: a run resumes only under the same ones."""
    ft = {k: v for k, v in cfg.finetune.model_dump(mode="json").items() if k not in _RESUMABLE}
    ft["scaling"] = {"num_workers": cfg.finetune.scaling.num_workers}
    # where the miniature base is cached is not what it is (its recipe hash is)
    model = cfg.model.model_dump(
        mode="json", exclude={"device": True, "dtype": True, "miniature": {"cache_dir"}}
    )
    data = cfg.data.model_dump(mode="json")
    data["root"] = (
        str(Path(data["root"]).expanduser().resolve()) if not is_uri(data["root"]) else data["root"]
    )
    return {"finetune": ft, "model": model, "data": data}


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two fingerprints."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += fingerprint_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def finished_run(cfg: BusdiffConfig) -> dict[str, Any] | None:
    """``run.json`` of ``finetune.out`` when it records a finished run of exactly ``cfg``: status done, the
    same training fingerprint, the same resolved config.yaml, and adapters/adapter.json in place. Else None,
    and the run is resumed or refused as ``trainer.prepare`` decides. Reads nothing but those three files."""
    out = resolve_out(cfg.finetune.out)
    text = read_text(join(out, "run.json"))
    run = json.loads(text) if text else {}
    if run.get("status") != "done" or fingerprint_diff(run.get("fingerprint") or {}, fingerprint(cfg)):
        return None
    if read_text(join(out, "config.yaml")) != dump_config(cfg):
        return None  # e.g. another log_every: rerun as before (it resumes at the last step, trains nothing)
    return run if read_text(join(out, "adapters", "adapter.json")) is not None else None


class MetricsLog:
    """metrics.jsonl, rewritten whole at each log step (atomic locally, one object on a store). On resume
    the lines after the checkpoint's step are dropped: the resumed run logs those steps again."""

    def __init__(self, path: str, resume_step: int) -> None:
        self.path = path
        old = read_text(path) or ""
        self.lines = [
            ln for ln in old.splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
        ]

    def append(self, row: dict[str, Any]) -> None:
        self.lines.append(json.dumps(row, sort_keys=True))
        write_text(self.path, "\n".join(self.lines) + "\n")


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def worker_info(rank: int, world_size: int, device: str, resumed_from: int, shard_ids: list[str]) -> dict:
    import socket

    return {
        "rank": rank,
        "world_size": world_size,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": device,
        "resumed_from_step": resumed_from,
        "n_rows": len(shard_ids),
        "shard_ids": shard_ids,
    }

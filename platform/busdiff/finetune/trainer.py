"""``run_finetune(cfg)``: check the inputs, prepare the run directory, and train on Ray Train.

Every check that can fail on bad input runs here, in the driver, before any worker starts: the method and
ranks (pydantic), the data folder and the training split, the base model and its tokenizer, the
placeholder tokens, the batch size against the split, and the run directory's earlier config.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from busdiff.config import BusdiffConfig, ConfigError, dump_config
from busdiff.data.busi import load_dataset
from busdiff.data.records import DatasetError, ImageRecord
from busdiff.data.splits import assign_splits
from busdiff.finetune.data import TRAIN, RankShards, shard_bounds, training_items
from busdiff.finetune.loop import train_loop_per_worker
from busdiff.finetune.recipe import caption_templates, class_tokens, phases, placeholder_tokens
from busdiff.finetune.rundir import (
    fingerprint,
    fingerprint_diff,
    join,
    read_text,
    resolve_out,
    storage_and_name,
    write_json,
)
from busdiff.models.presets import ModelLoadError, build_tokenizer, model_id, resolve_miniature
from busdiff.provenance import package_versions
from busdiff.storage import write_text

log = logging.getLogger(__name__)


class FinetuneError(RuntimeError):
    """Training ran and failed; the message says where the run directory is and how to resume."""


@dataclass
class Prepared:
    """The result of the checks: what the workers will train on."""

    records: list[ImageRecord]
    out: str
    fingerprint: dict[str, Any]
    resumable: bool  # the run directory holds an earlier run of the same config


@dataclass
class FinetuneResult:
    out: str
    adapter_dir: str
    steps: int
    n_images: int
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ checks


def training_records(cfg: BusdiffConfig) -> list[ImageRecord]:
    """The records of the split(s) ``finetune.splits`` names (splits assigned by ``data.split`` when the
    data has none). Errors name the field."""
    try:
        loaded = load_dataset(cfg.data.root, cfg.data.layout, cfg.data.skip_bad)
        records = assign_splits(loaded.records, cfg.data.split)
    except DatasetError as e:
        raise ConfigError(f"data.root={cfg.data.root!r}: {e}") from e
    chosen = [r for r in records if r.split in cfg.finetune.splits]
    if not chosen:
        have = sorted({r.split or "none" for r in records})
        raise ConfigError(
            f"finetune.splits={cfg.finetune.splits}: no image of {cfg.data.root} is in these "
            f"split(s); the data has the splits {have}"
        )
    return chosen


def _tokenizer(cfg: BusdiffConfig) -> Any:
    """The base model's tokenizer: proves the base model is there, without loading its weights."""
    m = resolve_miniature(cfg.model)  # miniature: its cached folder, pretrained here (once) when missing
    if m.preset == "tiny":
        return build_tokenizer()
    if m.preset == "sd15-shape":
        return build_tokenizer(49408)
    from transformers import CLIPTokenizer

    path = Path(m.base).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file() or not (path / "tokenizer").is_dir():
            raise ModelLoadError(
                f"model.base={m.base!r}: {path} is not a diffusers pipeline folder "
                f"(needs model_index.json and tokenizer/)"
            )
        return CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer", local_files_only=True)
    try:
        return CLIPTokenizer.from_pretrained(m.base, subfolder="tokenizer")
    except Exception as e:  # hub errors, offline, bad id
        raise ModelLoadError(
            f"model.base={m.base!r}: not a local folder, and its tokenizer could not be loaded from the "
            f"Hugging Face cache or hub ({type(e).__name__}). Point model.base at a local diffusers folder "
            f"(with model_index.json), e.g. --set model.base=/models/stable-diffusion-v1-5"
        ) from None


class _RowsOnly:
    """Stands in for the text encoder when checking tokens: add_ti_tokens only needs embedding rows."""

    def __init__(self, n: int) -> None:
        import torch

        self._emb = torch.nn.Embedding(n, 1)

    def get_input_embeddings(self) -> Any:
        return self._emb

    def resize_token_embeddings(self, n: int, mean_resizing: bool = False) -> None:
        import torch

        self._emb = torch.nn.Embedding(n, 1)


def check_tokens(cfg: BusdiffConfig, tokenizer: Any) -> None:
    """The placeholder tokens can be added (not in the vocabulary, survive lowercasing) and the initializer
    is one token: the same rules ``add_ti_tokens`` applies on the workers."""
    from busdiff.models.adapters import add_ti_tokens

    tokens = placeholder_tokens(cfg.finetune)
    if not tokens:
        return
    ti = cfg.finetune.ti
    try:
        add_ti_tokens(
            copy.deepcopy(tokenizer),
            _RowsOnly(len(tokenizer)),
            tokens,
            ti.initializer_token,
            num_vectors=ti.num_vectors,
        )
    except ValueError as e:
        field_name = "finetune.ti.initializer_token" if "initializer" in str(e) else "finetune.ti.token"
        raise ConfigError(f"{field_name}: {e}") from None
    # Added tokens also match inside words ("ormal" in "normal"): a placeholder may appear only at {token}.
    toks = class_tokens(cfg.finetune)
    for c, template in caption_templates(cfg.finetune).items():
        if toks[c].lower() in template.replace("{token}", " ").lower():
            raise ConfigError(
                f"finetune.ti.token={toks[c]!r} occurs inside the caption of {c} ({template!r}): the "
                f"tokenizer would split those words around it; use a token no caption word contains, e.g. "
                f"<{toks[c]}>"
            )


def check_batches(cfg: BusdiffConfig, n_rows: int) -> None:
    world = cfg.finetune.scaling.num_workers
    smallest, _ = shard_bounds(n_rows, world)
    for p in phases(cfg.finetune):
        section = "lora" if p.name != "ti" else "ti"
        if smallest < p.batch_size:
            raise ConfigError(
                f"finetune.{section}.batch_size={p.batch_size}: {n_rows} training images over "
                f"finetune.scaling.num_workers={world} leave {smallest} per worker, fewer than one batch"
            )


def check_device(cfg: BusdiffConfig) -> None:
    device, use_gpu = cfg.model.device, cfg.finetune.scaling.use_gpu
    if (device == "cuda" and not use_gpu) or (device == "cpu" and use_gpu):
        raise ConfigError(
            f"finetune.scaling.use_gpu={str(use_gpu).lower()} contradicts model.device={device}: the workers "
            "train on a GPU exactly when finetune.scaling.use_gpu is true (model.device may stay auto)"
        )


def prepare(cfg: BusdiffConfig) -> Prepared:
    """All checks, in the driver, before any worker starts (ConfigError / ModelLoadError name the field)."""
    check_device(cfg)
    records = training_records(cfg)
    check_tokens(cfg, _tokenizer(cfg))
    check_batches(cfg, len(records))
    try:
        out = resolve_out(cfg.finetune.out)
        storage_and_name(out)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fp = fingerprint(cfg)
    earlier = read_text(join(out, "run.json"))
    resumable = False
    if earlier:
        before = json.loads(earlier).get("fingerprint") or {}
        changed = fingerprint_diff(before, fp)
        if changed:
            raise ConfigError(
                f"finetune.out={cfg.finetune.out!r} holds a run with another training config (changed: "
                f"{', '.join(changed)}); rerun with the same config to resume it, "
                "or choose another finetune.out"
            )
        resumable = True
    return Prepared(records, out, fp, resumable)


# ------------------------------------------------------------------------------------------------ run


def _run_json(prep: Prepared, cfg: BusdiffConfig, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "status": status,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": cfg.finetune.method,
        "base_model": model_id(cfg.model),
        "n_images": len(prep.records),
        "fingerprint": prep.fingerprint,
        "packages": package_versions(),
        **extra,
    }


def run_finetune(cfg: BusdiffConfig, prepared: Prepared | None = None) -> FinetuneResult:
    """Train the adapters of ``cfg.finetune`` on the connected Ray cluster (the caller connects). Rerunning
    with the same ``finetune.out`` resumes from its latest checkpoint. ``prepared``: the result of
    ``prepare(cfg)`` when the caller already ran the checks."""
    t0 = time.perf_counter()
    prep = prepared or prepare(cfg)  # before anything touches Ray
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ft, out = cfg.finetune, prep.out
    write_text(join(out, "config.yaml"), dump_config(cfg))
    write_json(
        join(out, "inputs.json"),
        [{"id": r.id, "label": r.label, "split": r.split, "sha256": r.sha256} for r in prep.records],
    )
    write_json(join(out, "run.json"), _run_json(prep, cfg, "running"))

    s = ft.scaling
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus and s.num_workers * s.cpus_per_worker >= cpus:
        log.warning(
            "finetune.scaling takes %g of the cluster's %g CPUs: Ray Data's decode tasks wait for a free CPU "
            "(fine on an autoscaling cluster; on a fixed one leave a CPU free)",
            s.num_workers * s.cpus_per_worker,
            cpus,
        )
    items = training_items(prep.records)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 32, 64)))
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    storage_path, name = storage_and_name(out)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "out": out,
            "trained_ids": sorted(r.id for r in prep.records),
            "n_rows": len(items),
            "fingerprint": prep.fingerprint,
        },
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=ft.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ft.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={TRAIN: ds},
        dataset_config=RankShards(ft.resolution, center_crop=ft.crop == "center"),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        write_json(
            join(out, "run.json"), _run_json(prep, cfg, "failed", error=f"{type(e).__name__}: {e}"[:2000])
        )
        raise FinetuneError(
            f"fine-tuning failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the run "
            f"directory {out} keeps its checkpoints: rerun the same config to resume"
        ) from e
    steps = sum(p.steps for p in phases(ft))
    adapter_dir = join(out, "adapters")
    metrics = dict(result.metrics or {})
    seconds = time.perf_counter() - t0
    write_json(
        join(out, "run.json"),
        _run_json(
            prep,
            cfg,
            "done",
            steps=steps,
            adapter_dir=adapter_dir,
            metrics=metrics,
            seconds=round(seconds, 1),
        ),
    )
    return FinetuneResult(out, adapter_dir, steps, len(prep.records), metrics, seconds)

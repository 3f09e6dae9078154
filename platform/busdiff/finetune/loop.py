"""One Ray Train worker's loop: take this rank's shard, resume from the latest checkpoint, run the phases,
log, validate, checkpoint, and (rank 0) write the final adapter.

Every worker calls ``ray.train.report`` at the same steps (it is a barrier). Only rank 0 writes files and
checkpoints. A checkpoint holds the trainable tensors, the optimizer / lr-schedule / loss-scaler state and
the global step; data order and noise are functions of (seed, phase, micro-batch, rank), so a run resumed
from step k repeats exactly what the uninterrupted run did after step k.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from busdiff.config import BusdiffConfig
from busdiff.finetune.data import TRAIN, EpochBatches, collect_rows
from busdiff.finetune.learner import Learner, broadcast_trainable
from busdiff.finetune.model import FinetuneModel
from busdiff.finetune.recipe import Phase, class_tokens, phases
from busdiff.finetune.rundir import (
    LORA_PHASE_ADAPTERS,
    MetricsLog,
    join,
    local_staging,
    publish_dir,
    worker_info,
    write_json,
)
from busdiff.finetune.validation import grid_png, validation_images
from busdiff.storage import write_bytes

TRAINABLE_FILE = "trainable.safetensors"
LEARNER_FILE = "learner.pt"
STATE_FILE = "state.json"


def staging_dir(out: str) -> Path:
    """Where rank 0 writes a checkpoint before Ray Train copies it to storage: one local folder per run, so
    a worker killed mid-checkpoint leaves at most this folder, which the next attempt clears."""
    return Path(tempfile.gettempdir()) / f"busdiff-ckpt-{hashlib.sha256(out.encode()).hexdigest()[:12]}"


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()


def adapter_extra(cfg: BusdiffConfig, model: FinetuneModel, step: int) -> dict[str, Any]:
    ft = cfg.finetune
    return {
        "method": ft.method,
        "steps": step,
        "phases": [p.to_dict() for p in phases(ft)],
        "captions": model.prompts,  # as a pipeline takes them (it expands multi-vector tokens itself)
        "class_tokens": class_tokens(ft) if model.tokens else {},
        "splits": list(ft.splits),
        "resolution": ft.resolution,
        "seed": ft.seed,
    }


class _Clock:
    """Samples/s over a log interval, leaving out time spent on validation and checkpoints."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.paused = 0.0
        self.loss_sum = 0.0
        self.steps = 0
        self.samples = 0
        self.train_seconds = 0.0  # cumulative, for ETA and the benchmark

    def add(self, loss: float, samples: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.samples += samples

    def take(self) -> tuple[float, float, float]:
        now = time.perf_counter()
        dt = max(now - self.start - self.paused, 1e-9)
        self.train_seconds += dt
        out = (self.loss_sum / max(self.steps, 1), self.samples / dt, dt)
        self.start, self.paused, self.loss_sum, self.steps, self.samples = now, 0.0, 0.0, 0, 0
        return out


def say(line: str) -> None:
    """One progress line on stdout. Not print(): Ray Train patches print into its logger, which the driver
    then shows twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``. ``config``: the resolved BusdiffConfig (``cfg``), the run
    directory ``out``, ``trained_ids`` and ``n_rows`` (rows of the training split)."""
    import ray.train
    import ray.train.torch

    cfg = BusdiffConfig.model_validate(config["cfg"])
    ft, out = cfg.finetune, config["out"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if ft.scaling.use_gpu else torch.device("cpu")

    rows = collect_rows(ray.train.get_dataset_shard(TRAIN).iter_rows())
    model = FinetuneModel(cfg, device)
    if world > 1:
        broadcast_trainable(model)
    plan = phases(ft)
    total = sum(p.steps for p in plan)

    step, learner_state = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
            if state["fingerprint"] != config["fingerprint"]:
                raise RuntimeError(
                    f"checkpoint {ckpt.path} was written by a run with another training config"
                )
            model.load_trainable_state(load_file(str(Path(d) / TRAINABLE_FILE)))
            learner_state = torch.load(Path(d) / LEARNER_FILE, map_location=device, weights_only=True)
            step = int(state["step"])
    info = worker_info(rank, world, str(device), step, [r["id"] for r in rows])
    info["start_weights_sha256"] = weights_digest(model.trainable_state())
    write_json(join(out, "workers", f"rank-{rank}.json"), info)
    log = MetricsLog(join(out, "metrics.jsonl"), step) if rank == 0 else None
    if rank == 0:
        shutil.rmtree(staging_dir(out), ignore_errors=True)  # left by a worker killed mid-checkpoint
    if rank == 0:
        say(
            f"finetune: {ft.method} on {config['n_rows']} images, {world} worker(s), {total} steps"
            + (f", resuming at step {step}" if step else "")
        )

    clock = _Clock()
    last: dict[str, Any] = {}
    offset = 0
    for pi, phase in enumerate(plan):
        if step >= offset + phase.steps:
            offset += phase.steps
            continue
        per_epoch = (config["n_rows"] // world) // phase.batch_size
        data = EpochBatches(
            rows,
            phase.batch_size,
            per_epoch,
            ft.seed,
            rank,
            ft.resolution,
            ft.random_flip,
            ft.crop == "random",
        )
        learner = Learner(model, phase, pi, world)
        if learner_state is not None and step > offset:
            learner.load_state_dict(learner_state)
        learner_state = None
        for phase_step in range(step - offset, phase.steps):
            loss = learner.step(data, phase_step, rank)
            step = offset + phase_step + 1
            clock.add(loss, phase.samples_per_step(world))
            if step % ft.log_every == 0 or step == total:
                mean_loss, sps, _ = clock.take()
                last = {
                    "step": step,
                    "phase": phase.name,
                    "phase_step": phase_step + 1,
                    "loss": mean_loss,
                    "samples_per_s": sps,
                    "train_seconds": clock.train_seconds,
                    "epoch": data.epoch_of(phase_step * phase.grad_accum),
                    **learner.lrs(),
                }
                if device.type == "cuda":
                    last["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if log is not None:
                    log.append(last)
                    lr = " ".join(f"{k} {v:.2e}" for k, v in learner.lrs().items())
                    eta = sum(p.steps for p in plan[pi:]) - (phase_step + 1)
                    eta_s = eta * phase.samples_per_step(world) / max(sps, 1e-9)
                    say(
                        f"finetune: step {step}/{total} [{phase.name} {phase_step + 1}/{phase.steps}] "
                        f"loss {mean_loss:.4f} {lr} {sps:.2f} samples/s eta {_eta(eta_s)}"
                    )
            _after_step(cfg, model, learner, phase, step, total, rank, out, config, last, clock)
        offset += phase.steps

    if rank == 0:
        shutil.rmtree(staging_dir(out), ignore_errors=True)
        extra = adapter_extra(cfg, model, step)
        _publish_adapter(model, out, "adapters", config["trained_ids"], extra)
        if [p.name for p in plan] == ["lora", "ti"]:
            # The LoRA is frozen while TI trains, so it is still the LoRA phase's: save it alone too,
            # for a study's `lora` configuration (the token's place then takes the initializer word,
            # whose embedding the token had throughout the LoRA phase).
            lora_extra = {**extra, "phases": extra["phases"][:1], "steps": plan[0].steps, "class_tokens": {}}
            _publish_adapter(model, out, LORA_PHASE_ADAPTERS, config["trained_ids"], lora_extra,
                             lora_only=True)
    final = {**info, "finished": True, "weights_sha256": weights_digest(model.trainable_state())}
    write_json(join(out, "workers", f"rank-{rank}.json"), final)


def _publish_adapter(model: FinetuneModel, out: str, name: str, trained_ids: list[str], extra: dict[str, Any],
                     lora_only: bool = False) -> None:
    staging, remote = local_staging(out, name)
    model.save_adapter(staging, trained_ids, extra, lora_only=lora_only)
    if remote:
        publish_dir(staging, join(out, name))
        shutil.rmtree(staging, ignore_errors=True)


def _after_step(
    cfg: BusdiffConfig,
    model: FinetuneModel,
    learner: Learner,
    phase: Phase,
    step: int,
    total: int,
    rank: int,
    out: str,
    config: dict[str, Any],
    last: dict[str, Any],
    clock: _Clock,
) -> None:
    """Validation grid, checkpoint and report at the steps the config names (the same on every rank)."""
    import ray.train

    ft = cfg.finetune
    v = ft.validation
    if rank == 0 and ((v.every and step % v.every == 0) or step == total):
        t = time.perf_counter()
        png = grid_png(validation_images(model, v, ft.resolution))
        write_bytes(join(out, "validation", f"step_{step:06d}.png"), png)
        clock.paused += time.perf_counter() - t
    checkpoint = (ft.checkpoint_every and step % ft.checkpoint_every == 0) or step == total
    if not checkpoint and step % ft.report_every:
        return
    metrics = dict(last or {"step": step, "phase": phase.name})
    if not checkpoint:
        ray.train.report(metrics)
        return
    t = time.perf_counter()
    name = f"checkpoint_{step:06d}"
    if rank == 0:
        d = staging_dir(out) / name
        try:
            _write_checkpoint(d, cfg, model, learner, step, config)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name
            )
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        ray.train.report(metrics, checkpoint_dir_name=name)
    clock.paused += time.perf_counter() - t


def _write_checkpoint(
    d: Path, cfg: BusdiffConfig, model: FinetuneModel, learner: Learner, step: int, config: dict[str, Any]
) -> None:
    d.mkdir(parents=True, exist_ok=True)
    model.save_adapter(d / "adapter", config["trained_ids"], adapter_extra(cfg, model, step))
    save_file(model.trainable_state(), str(d / TRAINABLE_FILE))
    torch.save(learner.state_dict(), d / LEARNER_FILE)
    (d / STATE_FILE).write_text(
        json.dumps({"step": step, "fingerprint": config["fingerprint"]}, sort_keys=True)
    )

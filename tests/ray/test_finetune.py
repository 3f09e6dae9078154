"""Fine-tuning on Ray Train (the shared local cluster): two data-parallel workers, shards, checkpoints,
and a rerun that resumes. Runs are shared between tests to keep Ray Train starts few. A worker group that
loses a rank mid-run (its whole node) and restarts from the checkpoint: tests/multinode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from busdiff.cli import main
from busdiff.config import ConfigError, load_config
from busdiff.data.phantom import write_phantom
from busdiff.finetune.data import RankShards, training_items
from busdiff.finetune.loop import weights_digest
from busdiff.finetune.model import FinetuneModel
from busdiff.finetune.trainer import prepare, run_finetune
from busdiff.models.adapters import read_adapter_json
from busdiff.models.presets import build_components

STEPS = 30


def _sets(root: Path, out: Path, *sets: str) -> list[str]:
    return [
        f"data.root={root}",
        "model.preset=tiny",
        "model.device=cpu",
        f"finetune.out={out}",
        "finetune.method=lora+ti",
        f"finetune.lora.steps={STEPS}",
        "finetune.lora.batch_size=2",
        "finetune.lora.lr=1e-2",
        "finetune.ti.lr=1e-2",
        "finetune.resolution=32",
        "finetune.mixed_precision=no",
        "finetune.checkpoint_every=10",
        "finetune.log_every=5",
        "finetune.report_every=5",
        "finetune.validation.every=10",
        "finetune.validation.n_per_class=1",
        "finetune.validation.steps=2",
        "finetune.scaling.num_workers=2",
        "finetune.scaling.cpus_per_worker=1",
        *sets,
    ]


def _config(root: Path, out: Path, *sets: str):
    return load_config(None, _sets(root, out, *sets))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ftray") / "busi"
    write_phantom(root, 4, seed=7, size=64)  # 9 train images: shards of 5 and 4
    return root


@pytest.fixture(scope="module")
def reference(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("ftray") / "reference"
    cfg = _config(phantom, out)
    return cfg, run_finetune(cfg)


def _json(p: Path):
    return json.loads(p.read_text())


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_shards_deal_every_row_to_exactly_one_worker(phantom):
    import ray

    records = prepare(load_config(None, [f"data.root={phantom}", "model.preset=tiny"])).records
    ds = ray.data.from_items(training_items(records))
    shards = RankShards(resolution=32, center_crop=True).configure({"train": ds}, 4, None, None)
    ids = [[r["id"] for r in s["train"].iter_rows()] for s in shards]
    assert sorted(len(i) for i in ids) == [2, 2, 2, 3]
    assert sorted(sum(ids, [])) == sorted(r.id for r in records)  # every train image once, none twice
    again = RankShards(resolution=32, center_crop=True).configure({"train": ds}, 4, None, None)
    assert [sorted(r["id"] for r in s["train"].iter_rows()) for s in again] == [sorted(i) for i in ids]
    row = next(iter(shards[0]["train"].iter_rows()))
    assert row["image"].shape == (32, 32, 3) and row["image"].dtype == np.uint8


def test_two_workers_cover_the_split_once_and_stay_in_sync(reference):
    cfg, res = reference
    out = Path(res.out)
    train_ids = sorted(r["id"] for r in _json(out / "inputs.json"))
    assert len(train_ids) == res.n_images == 9
    ranks = [_json(out / "workers" / f"rank-{r}.json") for r in range(2)]
    shard_ids = [set(w["shard_ids"]) for w in ranks]
    assert not shard_ids[0] & shard_ids[1] and sorted(shard_ids[0] | shard_ids[1]) == train_ids
    assert all(w["finished"] and w["world_size"] == 2 for w in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients were averaged


def test_ranks_start_and_end_at_the_same_weights_on_a_pretrained_base(phantom, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = tmp_path / "base"  # loading it draws nothing from torch's RNG, unlike the seeded tiny preset
    StableDiffusionPipeline(**build_components("tiny"), requires_safety_checker=False).save_pretrained(base)
    sets = ("model.preset=pretrained", f"model.base={base}", "finetune.lora.text_encoder=true")
    cfg = _config(phantom, tmp_path / "run", *sets, "finetune.lora.steps=2")
    run_finetune(cfg)
    ranks = [_json(tmp_path / "run" / "workers" / f"rank-{r}.json") for r in range(2)]
    assert ranks[0]["start_weights_sha256"] == ranks[1]["start_weights_sha256"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # finetune.seed decides the start, not the process: this one builds the workers' start too
    here = FinetuneModel(cfg, torch.device("cpu")).trainable_state()
    assert weights_digest(here) == ranks[0]["start_weights_sha256"]


def test_run_dir_holds_metrics_validation_grids_and_the_adapter(reference):
    cfg, res = reference
    out = Path(res.out)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(5, STEPS + 1, 5))
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 and r["lr_lora"] == 1e-2 for r in rows)
    assert res.metrics["step"] == STEPS and res.steps == STEPS
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step_000010.png", "step_000020.png", "step_000030.png"]
    with Image.open(out / "validation" / grids[0]) as im:
        assert im.size[1] > 3 * 32  # a row per class
    assert sorted(p.name for p in out.glob("checkpoint_0*")) == ["checkpoint_000020", "checkpoint_000030"]
    meta = read_adapter_json(out / "adapters")
    split = {r.id: r.split for r in prepare(cfg.model_copy()).records}
    assert sorted(meta["trained_ids"]) == sorted(split) and set(split.values()) == {"train"}
    assert meta["base_model"] == "tiny" and meta["tokens"] == ["<bus>"] and meta["rank"] == 4
    assert meta["extra"]["method"] == "lora+ti" and "<bus>" in meta["extra"]["captions"]["benign"]
    assert _json(out / "run.json")["status"] == "done"


def test_cli_rerun_of_a_finished_run_answers_from_the_run_directory(reference, phantom, capsys):
    """`busdiff finetune` of a finished run (issue 10, item 10): answered from run.json before the data is
    read or Ray started, every file left as it is; another recipe is still refused, naming the field."""
    _, ref = reference
    out = Path(ref.out)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    args = [a for s in _sets(phantom, out) for a in ("--set", s)]
    r = subprocess.run(
        [str(Path(sys.executable).parent / "busdiff"), "finetune", *args],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already finished" in r.stdout and "connected to Ray" not in r.stdout
    assert json.loads(r.stdout[r.stdout.index("{"):])["steps"] == STEPS
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files
    assert main(["finetune", *args, "--set", "finetune.lora.rank=2"]) == 2
    assert "finetune.lora.rank" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


def test_rerun_resumes_from_the_latest_checkpoint_and_refuses_another_config(reference, phantom):
    ref_cfg, ref = reference
    out = Path(ref.out)
    before = load_file(str(out / "adapters" / "pytorch_lora_weights.safetensors"))
    run_finetune(ref_cfg)  # the finished run: resumes at its last step, trains nothing
    assert {_json(out / "workers" / f"rank-{r}.json")["resumed_from_step"] for r in range(2)} == {STEPS}
    after = load_file(str(out / "adapters" / "pytorch_lora_weights.safetensors"))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    with pytest.raises(ConfigError, match="finetune.lora.rank"):
        run_finetune(_config(phantom, out, "finetune.lora.rank=2"))

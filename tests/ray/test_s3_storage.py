"""Outputs on a real S3 API server (moto on loopback, tests/s3.py), reached the standard AWS way: the
endpoint and credentials are in the environment of the driver and of the shared cluster's workers.
Generation: the sink writes every planned image, a grown plan makes only the new ids, and a rerun rewrites
no object. Fine-tuning: the run directory and Ray Train's checkpoints live in the bucket, and a rerun
resumes from the checkpoint there."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import safetensors.torch
import torch
from PIL import Image

from busdiff.config import load_config
from busdiff.data.phantom import write_phantom
from busdiff.finetune.trainer import run_finetune
from busdiff.generate.pipeline import run_generate
from busdiff.generate.sink import METADATA, SAMPLES
from tests.ray.test_finetune import _sets as _finetune_sets
from tests.ray.test_generate_pipeline import BASE, _sets
from tests.s3 import BUCKET

OUT = f"s3://{BUCKET}/gen"


def _cfg(count: int):
    return load_config(None, [*_sets(BASE), f"generate.out={OUT}", f"generate.count={count}"])


def test_generation_into_s3_resumes_and_a_rerun_writes_nothing(s3_for_ray):
    s3 = s3_for_ray
    first = run_generate(_cfg(1))
    assert (first.written, first.skipped, first.planned) == (3, 0, 3)
    grown = run_generate(_cfg(2))  # resumes: only the three new ids are made
    assert (grown.written, grown.skipped, grown.planned) == (3, 3, 6)

    objects = s3.objects("gen/")
    pngs = sorted(k for k in objects if k.startswith(f"gen/{SAMPLES}/") and k.endswith(".png"))
    assert pngs == [f"gen/{SAMPLES}/{c}/syn-{c}-{i:05d}.png" for c in ("benign", "malignant", "normal")
                    for i in range(2)]
    client = s3.client()

    def read(key: str) -> bytes:
        return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    for key in pngs:
        Image.open(io.BytesIO(read(key))).load()  # every PNG decodes
    meta = pq.read_table(io.BytesIO(read(f"gen/{SAMPLES}/{METADATA}")))
    assert sorted(meta["id"].to_pylist()) == sorted(k.rsplit("/", 1)[1].removesuffix(".png") for k in pngs)
    assert {"gen/plan.json", "gen/config.yaml", "gen/summary.json"} <= set(objects)

    again = run_generate(_cfg(2))  # answered from the sink
    assert (again.written, again.skipped) == (0, 6)
    assert s3.objects("gen/") == objects  # no object rewritten (same ETag and Last-Modified)


STEPS = 10  # one checkpoint (checkpoint_every=10)


def test_fine_tuning_into_s3_checkpoints_there_and_a_rerun_resumes_from_it(s3_for_ray, tmp_path):
    s3, out = s3_for_ray, f"s3://{BUCKET}/ft"
    write_phantom(tmp_path / "busi", 3, seed=7, size=64)  # 2 train images per class
    sets = [*_finetune_sets(tmp_path / "busi", out), f"finetune.lora.steps={STEPS}",
            "finetune.scaling.num_workers=1", "finetune.validation.every=0"]
    res = run_finetune(load_config(None, sets))
    assert res.steps == STEPS
    objects = s3.objects("ft/")
    assert {"ft/run.json", "ft/config.yaml", "ft/inputs.json", "ft/metrics.jsonl"} <= set(objects)
    assert "ft/adapters/pytorch_lora_weights.safetensors" in objects and "ft/adapters/adapter.json" in objects
    assert any(k.startswith(f"ft/checkpoint_{STEPS:06d}/") for k in objects), sorted(objects)
    client = s3.client()

    def read_json(key: str):
        return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def weights() -> dict[str, torch.Tensor]:
        body = client.get_object(Bucket=BUCKET, Key="ft/adapters/pytorch_lora_weights.safetensors")["Body"]
        return safetensors.torch.load(body.read())

    assert read_json("ft/run.json")["status"] == "done"
    before = weights()
    run_finetune(load_config(None, sets))  # the finished run: restores its last checkpoint from S3
    assert read_json("ft/workers/rank-0.json")["resumed_from_step"] == STEPS
    after = weights()  # trained nothing more
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)

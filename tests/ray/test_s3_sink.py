"""Generation into a real S3 API server (moto on loopback, tests/s3.py), reached the standard AWS way: the
endpoint and credentials are in the environment of the driver and of the shared cluster's workers. The
sink writes every planned image, a grown plan makes only the new ids, and a rerun rewrites no object."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
from PIL import Image

from busdiff.config import load_config
from busdiff.generate.pipeline import run_generate
from busdiff.generate.sink import METADATA, SAMPLES
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

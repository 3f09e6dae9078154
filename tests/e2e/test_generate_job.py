"""`ray job submit` of jobs/generate.py against a real head: the planned images and metadata appear with
no false alarm from Ray in the log, and a second submission answers from the finished sink, touching
nothing; the same into a real S3 API server, with a resumed (grown) run between."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pyarrow.parquet as pq
from PIL import Image

from busdiff.generate.sink import SAMPLES
from tests.conftest import REPO
from tests.s3 import BUCKET

SETS = [
    "model.preset=tiny",
    "model.device=cpu",
    "generate.count=1",
    "generate.size=32",
    "generate.steps=4",
    "generate.refine_steps=4",
    "generate.strength=0.5",
    # the head has 2 CPUs: both actor pools and the writer tasks fit beside each other
    "generate.text2img.num_cpus=0.5",
    "generate.img2img.num_cpus=0.5",
    "generate.writer_num_cpus=0.5",
]


def _files(out):
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_generate_job_then_resubmission_writes_nothing(ray_head, tmp_path):
    out = tmp_path / "generated"
    args = ["python", "jobs/generate.py", "jobs/configs/generate-tiny.yaml", "--set", f"generate.out={out}"]
    for s in SETS:
        args += ["--set", s]

    first = ray_head.submit(*args)
    assert "connected to Ray: 2 CPUs" in first.stdout
    assert "3 written, 0 skipped" in first.stdout
    # Ray's "... max_restarts > 0" line about Ray Data's actor pools is a false alarm: dropped (issue 10, 9)
    assert "max_restarts > 0" not in first.stdout + first.stderr
    pngs = sorted(p.relative_to(out / SAMPLES).as_posix() for p in (out / SAMPLES).rglob("*.png"))
    assert pngs == [f"{c}/syn-{c}-00000.png" for c in ("benign", "malignant", "normal")]
    meta = pq.read_table(out / SAMPLES / "metadata.parquet")
    assert sorted(meta["file_name"].to_pylist()) == pngs
    assert set(meta["base_model"].to_pylist()) == {"tiny"} and (out / "plan.json").is_file()
    before = _files(out)

    second = ray_head.submit(*args)
    assert "already holds all 3 planned images" in second.stdout and "0 written, 3 skipped" in second.stdout
    assert _files(out) == before  # summary.json included: a finished sink is left as it is


def test_generate_job_into_s3_resumes_and_a_rerun_writes_nothing(ray_head, s3):
    """Every output on a real S3 API server (tests/s3.py), reached the standard AWS way: the job's
    environment carries AWS_ENDPOINT_URL and the credentials, as an instance profile would on a cluster."""
    def sets(count: int) -> list[str]:
        kept = [s for s in SETS if not s.startswith("generate.count=")]
        pairs = [f"generate.out=s3://{BUCKET}/gen", *kept, f"generate.count={count}"]
        flags = [a for s in pairs for a in ("--set", s)]
        return ["jobs/generate.py", "jobs/configs/generate-tiny.yaml", *flags]

    def submit(count: int) -> str:
        return ray_head.ray("job", "submit", "--runtime-env-json", json.dumps({"env_vars": s3.env}),
                            "--working-dir", ".", "--", "python", *sets(count)).stdout

    assert "3 written, 0 skipped" in submit(1)
    grown = submit(2)  # resumes: only the three new ids are made
    assert "3 written, 3 skipped" in grown, grown[-2000:]
    objects = s3.objects("gen/")
    pngs = sorted(k for k in objects if k.startswith(f"gen/{SAMPLES}/") and k.endswith(".png"))
    assert pngs == [f"gen/{SAMPLES}/{c}/syn-{c}-{i:05d}.png" for c in ("benign", "malignant", "normal")
                    for i in range(2)]
    client = s3.client()
    for key in pngs:
        Image.open(io.BytesIO(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())).load()
    meta = pq.read_table(io.BytesIO(client.get_object(Bucket=BUCKET, Key=f"gen/{SAMPLES}/metadata.parquet")
                                    ["Body"].read()))
    assert sorted(meta["id"].to_pylist()) == sorted(k.rsplit("/", 1)[1][:-4] for k in pngs)

    # the rerun a user types on a machine with the bucket's credentials: answered from the sink, no Ray
    again = subprocess.run([sys.executable, *sets(2)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "already holds all 6 planned images" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert s3.objects("gen/") == objects  # no object rewritten (same ETag and Last-Modified)

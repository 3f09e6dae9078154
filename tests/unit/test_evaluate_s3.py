"""Evaluation on a real S3 API server (moto on loopback): synthetic images read from a bucket prefix (as the
generation sink writes them there), outputs and the feature cache in the bucket; the figures are those of
the same images on local disk, which take every feature from the bucket's cache."""

from __future__ import annotations

import json

import pytest

from busdiff.config import load_config
from busdiff.evaluate.inputs import InputError, check_synthetic
from busdiff.evaluate.run import run_evaluate
from tests.s3 import BUCKET
from tests.unit.evaluate_fixture import real_phantom, synthetic_folder


def _cfg(real, syn, out, cache):
    return load_config(None, [
        f"data.root={real}", f"evaluate.synthetic={syn}", f"evaluate.out={out}",
        f"evaluate.fid.cache_dir={cache}", "evaluate.fid.device=cpu", "evaluate.fid.bootstrap=20",
        "evaluate.fid.floor_draws=2", "evaluate.classifier.enabled=false",
        "evaluate.memorization.ssim_size=32",
    ])


def test_evaluation_reads_from_writes_to_and_caches_features_in_s3(s3, tmp_path):
    real = real_phantom(tmp_path / "busi", 14)
    syn = synthetic_folder(tmp_path / "samples", 3)
    client = s3.client()
    for p in sorted(syn.rglob("*.png")):
        client.put_object(Bucket=BUCKET, Key=f"corpus/samples/{p.parent.name}/{p.name}", Body=p.read_bytes())
    uri = f"s3://{BUCKET}/corpus/samples"
    assert check_synthetic(uri) == 9  # the pre-flight check lists and verifies the objects

    remote = run_evaluate(_cfg(real, uri, f"s3://{BUCKET}/eval", f"s3://{BUCKET}/cache"))
    assert {"eval/metrics.json", "eval/report.html", "eval/samples.png"} <= set(s3.objects("eval/"))
    saved = json.loads(client.get_object(Bucket=BUCKET, Key="eval/metrics.json")["Body"].read())
    assert saved["features"]["computed"] == remote.metrics["features"]["computed"]
    cached = s3.objects("cache/features/")
    assert len(cached) == remote.metrics["features"]["computed"] > 9  # one object a real or synthetic image

    # the same images on local disk: every feature comes from the bucket (keyed by content), same figures
    local = run_evaluate(_cfg(real, syn, tmp_path / "eval", f"s3://{BUCKET}/cache"))
    assert local.metrics["features"]["computed"] == 0
    fid = [{r["class"]: r["synthetic_vs_held_out"]["fid"] for r in res.metrics["fidelity"]["rows"]}
           for res in (remote, local)]
    assert fid[0] == fid[1]
    assert s3.objects("cache/features/") == cached  # nothing rewritten


def test_a_missing_synthetic_prefix_is_one_line_naming_it(s3):
    with pytest.raises(InputError, match=rf"synthetic folder s3://{BUCKET}/nothing does not exist"):
        check_synthetic(f"s3://{BUCKET}/nothing/")

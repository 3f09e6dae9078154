"""Object-store outputs against a real S3 API server on loopback (moto, tests/s3.py): a missing bucket,
refused credentials and an unreachable endpoint are each one line naming the field and URI, before any
work; an existing bucket is written as a local folder would be."""

from __future__ import annotations

import logging

import pytest

from busdiff import storage
from tests.s3 import BUCKET
from tests.unit.test_cli_newcomer_errors import busdiff, refused

GENERATE = "jobs/configs/generate-tiny.yaml"


def test_an_existing_bucket_passes_and_is_written(s3):
    storage.check_output_uri("generate.out", f"s3://{BUCKET}/runs/gen")
    storage.write_text(f"s3://{BUCKET}/runs/gen/summary.json", "{}")
    assert list(s3.objects("runs/gen")) == ["runs/gen/summary.json"]


def test_each_small_object_is_one_request(s3, caplog):
    """A corpus is tens of thousands of PNGs: each is one PutObject, not a multipart upload (3 requests),
    directory markers (a PUT per level) or a region lookup per file."""
    storage.write_text(f"s3://{BUCKET}/corpus/plan.json", "{}")  # the bucket's filesystem, made once
    caplog.set_level(logging.INFO, logger="werkzeug")  # the S3 server logs one line per request
    caplog.clear()
    for i in range(5):
        storage.write_bytes(f"s3://{BUCKET}/corpus/samples/benign/{i}.png", b"\x89PNG" + bytes(200))
    requests = [r.getMessage().split('"')[1] for r in caplog.records if r.name == "werkzeug"]
    assert requests == [f"PUT /{BUCKET}/corpus/samples/benign/{i}.png HTTP/1.1" for i in range(5)]
    pngs = [f"corpus/samples/benign/{i}.png" for i in range(5)]
    assert sorted(s3.objects("corpus")) == ["corpus/plan.json", *pngs]


def test_a_missing_bucket_is_refused_before_any_work(s3):
    uri = "s3://no-such-bucket/gen"
    msg = refused(busdiff("generate", GENERATE, "--set", f"generate.out={uri}"),
                  f"generate.out={uri}", "bucket 'no-such-bucket' does not exist", s3.endpoint)
    assert msg.count("\n") == 0
    assert s3.objects("") == {}


def test_refused_credentials_are_one_line_naming_the_uri(s3, monkeypatch):
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks keys
    with pytest.raises(OSError, match=rf"^study.out=s3://{BUCKET}/study: the credentials were refused"):
        storage.check_output_uri("study.out", f"s3://{BUCKET}/study")


def test_an_unreachable_endpoint_is_named(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(OSError, match=r"^evaluate.out=s3://x/y: the object store at http://127.0.0.1:9 can"):
        storage.check_output_uri("evaluate.out", "s3://x/y")


def test_an_adapter_in_a_bucket_reads_as_from_disk_and_a_changed_object_is_refused(s3, tmp_path, monkeypatch):
    """A study on a cloud cluster keeps its adapters in the bucket: generation, serving and the leakage guard
    read them from there (copied once into ~/.cache/busdiff, checked against adapter.json's sha256)."""
    from busdiff.models.adapters import AdapterError, local_adapter_dir, read_adapter_json
    from tests.unit.adapter_fixture import ti_adapter

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    local = ti_adapter(tmp_path / "adapter", "<bus>")
    uri = f"s3://{BUCKET}/study/finetune/abc/adapters"
    for f in local.iterdir():
        storage.write_bytes(f"{uri}/{f.name}", f.read_bytes())
    assert read_adapter_json(uri) == read_adapter_json(local)
    copy = local_adapter_dir(uri)
    assert copy.is_relative_to(tmp_path / "home" / ".cache" / "busdiff")
    files = {f.name: f.read_bytes() for f in local.iterdir()}
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == files

    storage.write_bytes(f"{uri}/learned_embeds.safetensors", b"not the trained embedding")
    monkeypatch.setenv("HOME", str(tmp_path / "another-node"))  # (the checked copy above stays valid)
    with pytest.raises(AdapterError, match=rf"{uri}/learned_embeds.safetensors does not match its sha256"):
        local_adapter_dir(uri)
    with pytest.raises(AdapterError, match=r"s3://busdiff-test/nothing/adapter.json is missing"):
        read_adapter_json(f"s3://{BUCKET}/nothing")

"""A real S3 API server on loopback (moto's server mode), configured the standard AWS way: the endpoint in
AWS_ENDPOINT_URL and credentials in the environment, which pyarrow, boto3 and child processes all read."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import requests

BUCKET = "busdiff-test"


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]  # what a child process needs to reach it (the test's own environment has it too)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials(self.env))

    def objects(self, prefix: str) -> dict[str, tuple[int, str, float]]:
        """Every object under ``s3://BUCKET/prefix`` but Arrow's empty directory markers (``.../``):
        key -> (size, etag, last modified)."""
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/"):
                    out[o["Key"]] = (o["Size"], o["ETag"], o["LastModified"].timestamp())
        return out


def _boto_credentials(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


@contextmanager
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """A moto S3 server on a free loopback port with bucket ``BUCKET``; the environment points at it
    (through ``monkeypatch``, so it is restored afterwards)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "busdiff-test",
        "AWS_SECRET_ACCESS_KEY": "busdiff-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-profile lookup on this machine
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3 = S3(env["AWS_ENDPOINT_URL"], env)
    try:
        # moto keeps its buckets in this process's memory, across servers: start from none
        requests.post(f"{s3.endpoint}/moto-api/reset", timeout=10).raise_for_status()
        s3.client().create_bucket(Bucket=BUCKET)
        yield s3
    finally:
        server.stop()

"""One local Ray cluster shared by every test in tests/ray (Ray's own testing advice); it shuts down when
the package's last test ends, so unit tests can prove they start no Ray. A real S3 API server runs beside
it for the object-storage tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="package")
def s3_for_ray():
    """A real S3 API server (tests/s3.py) whose endpoint and credentials are in the environment before the
    shared cluster starts, so that its workers reach it the standard AWS way, as a cluster's nodes would."""
    from tests.s3 import s3_server

    with pytest.MonkeyPatch.context() as mp, s3_server(mp) as server:
        yield server


@pytest.fixture(scope="package", autouse=True)
def ray_cluster(s3_for_ray):
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # 4 logical CPUs on 2 cores: actor pools that take every CPU starve Ray Data's read tasks and hang.
    ray.init(
        num_cpus=4,
        object_store_memory=300 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()

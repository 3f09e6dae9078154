"""One local Ray cluster shared by every test in tests/ray (Ray's own testing advice); it shuts down when
the package's last test ends, so unit tests can prove they start no Ray."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="package", autouse=True)
def ray_cluster():
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

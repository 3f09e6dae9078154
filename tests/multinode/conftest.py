"""Several raylets on this machine (``ray.cluster_utils.Cluster``): a head that runs nothing (CPU 0, as
cluster.yaml's head) and worker nodes the tests add and remove. One cluster per package; its driver is
this process, so the package runs in its own pytest process (make test runs it beside tests/e2e), never
in the one that holds tests/ray's shared cluster."""

from __future__ import annotations

import os

import pytest

from tests.e2e.harness import free_port, free_ports

_NAMES = ("dashboard_agent_listen_port", "metrics_export_port", "runtime_env_agent_port",
          "ray_client_server_port")


def _own_ports() -> dict[str, int]:
    """Ports with fixed defaults (agent 52365, client server 10001, ...) would clash with any other Ray
    cluster on this machine, such as tests/ray's shared one in the other lane. Distinct: the OS may hand
    out a port just freed again (seen in CI: the client server and the agent on one port)."""
    return dict(zip(_NAMES, free_ports(len(_NAMES)), strict=True))


@pytest.fixture(scope="package")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.pop("RAY_ADDRESS", None)
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            # Ray Train's controller asks the dashboard's state API about its workers
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
            # a lost node is declared dead after ~3 s (Ray's default: 30 s of missed health checks)
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
            **_own_ports(),
        },
    )
    # as busdiff's connect() does: workers' RAY_ADDRESS names this cluster, not a guess among several
    hook = {"worker_process_setup_hook": "busdiff.raycluster.know_own_cluster"}
    ray.init(address=c.address, log_to_driver=False, configure_logging=False, runtime_env=hook)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def add_node(cluster):
    """``add_node(num_cpus=...)``: a worker node with ports of its own; removed again after the test."""
    added = []

    def add(**kwargs):
        node = cluster.add_node(**{**_own_ports(), **kwargs})
        cluster.wait_for_nodes()
        added.append(node)
        return node

    yield add
    for node in added:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)

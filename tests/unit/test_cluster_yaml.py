"""cluster.yaml is checked with Ray's own launcher validation (schema + defaults), no cloud call."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validation(cluster):
    validate_config(cluster)
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_cpu_head_autoscaling_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no tasks or actors should land on the head"
    gpu = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    assert cluster["docker"]["image"].startswith("rayproject/ray:2.60.")
    assert cluster["docker"]["image"].endswith("-gpu")
    assert cluster["idle_timeout_minutes"] > 0


def test_dashboard_not_exposed(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in start and "--dashboard-host=127.0.0.1" in start


def test_validation_catches_a_typo(cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_the_fake_autoscaling_cluster_mirrors_cluster_yaml(cluster):
    """tests/e2e/fake-cluster.yaml (the autoscaling test's) has cluster.yaml's node types: a CPU-0 head and
    GPU workers from zero; only the head's name differs (the fake provider's own, ray.head.default)."""
    fake = yaml.safe_load((REPO / "tests" / "e2e" / "fake-cluster.yaml").read_text())
    validate_config(fake)  # (prepare_config would want the defaults file the wheel lacks for this provider)
    real_types, fake_types = cluster["available_node_types"], fake["available_node_types"]
    assert fake["head_node_type"] == "ray.head.default"
    assert set(fake_types) - {"ray.head.default"} == set(real_types) - {cluster["head_node_type"]}
    real_head = real_types[cluster["head_node_type"]]
    assert fake_types["ray.head.default"]["resources"]["CPU"] == real_head["resources"]["CPU"] == 0
    for name, real in real_types.items():
        if name == cluster["head_node_type"]:
            continue
        assert fake_types[name]["min_workers"] == real["min_workers"] == 0, name
        assert 1 <= fake_types[name]["max_workers"] <= real["max_workers"], name
        assert fake_types[name]["resources"]["GPU"] == 1, f"{name}: one GPU a node, as a g5.2xlarge has"

"""One way to reach Ray: join the cluster under ``ray job submit``, else start an embedded local one."""

from __future__ import annotations

import os
from typing import Any

from busdiff.config import RayConfig


def connect(cfg: RayConfig) -> dict[str, Any]:
    """Connect to Ray and return the cluster's resources.

    With ``cfg.address`` unset, plain ``ray.init()`` joins the cluster when RAY_ADDRESS is set (as it
    is under ``ray job submit``) and starts a local cluster otherwise; only a local start takes the
    resource caps from ``cfg`` (Ray refuses them when joining).
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    joining = cfg.address is not None or bool(os.environ.get("RAY_ADDRESS"))
    kwargs: dict[str, Any] = {"address": cfg.address, "log_to_driver": True}
    if not joining:
        kwargs.update(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=cfg.include_dashboard,
        )
    ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    return ray.cluster_resources()

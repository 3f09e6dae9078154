"""What every config-reading subcommand does before any heavy import or Ray: refuse to run the paper's full
recipe by accident (no config at all), load and validate the config, refuse paths a Ray job would lose and
a model folder that is not there, and warn, with an estimate, about SD-size work on CPUs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from busdiff.config import BusdiffConfig, ConfigError, check_model_base, load_config
from busdiff.estimate import cpu_estimate
from busdiff.jobpaths import check_job_paths, check_node_local_outputs, check_object_store_outputs

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"

#: The shipped configs written for each command (jobs/configs/).
SHIPPED = {
    "finetune": ("finetune-tiny.yaml", "sd15-busi.yaml"),
    "generate": ("generate-tiny.yaml", "generate-sd15-busi.yaml", "generate-sd15-fast.yaml"),
    "evaluate": ("evaluate-tiny.yaml", "evaluate-sd15-busi.yaml"),
    "study": ("study-tiny.yaml", "local.yaml", "study-mini-busi.yaml", "study-sd15-busi.yaml"),
    "demo": ("local.yaml",),
    "serve": ("serve-local.yaml",),
}


def shipped_configs(command: str) -> list[str]:
    """``  jobs/configs/NAME   <the first sentence of its header comment>`` for each config of ``command``
    (none in an installed package without the repository's jobs/)."""
    rows = []
    for name in SHIPPED.get(command, ()):
        path = CONFIGS / name
        if not path.is_file():
            continue
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            if not line.startswith("#   "):  # commands to run, not the description
                header.append(line.lstrip("# "))
        rows.append((f"jobs/configs/{name}", " ".join(header).split(": ")[0].split(". ")[0]))
    width = max((len(path) for path, _ in rows), default=0) + 2
    return [f"  {path:<{width}}{what}" for path, what in rows]


def command_config(config: str | None, overrides: list[str], command: str) -> BusdiffConfig:
    """The validated config of ``busdiff <command> [CONFIG] [--set ...]``. With neither a config file nor
    ``--set`` it refuses, listing the shipped configs: the built-in defaults are the paper's full recipe
    (512 px, 50 steps, 300 images per class, 3000 + 2000 fine-tuning steps), which a bare command should
    not start by accident; ``--set`` alone runs the defaults with those changes."""
    if config is None and not overrides:
        shipped = "\n".join(shipped_configs(command)) or "  (none found beside this installation)"
        raise ConfigError(
            f"no config given. Without one, busdiff {command} would run the built-in defaults, the paper's "
            "full recipe (`busdiff config` prints them; the stages take hours on CPUs). Name a config:\n"
            f"{shipped}\nor run the embedded default's study with `busdiff demo`; `busdiff config FILE` "
            "shows a config resolved. To run the defaults anyway, change them with --set KEY=VALUE."
        )
    cfg = load_config(config, overrides)
    check_job_paths(cfg, command)
    check_object_store_outputs(cfg, command)
    check_model_base(cfg)
    warning = cpu_estimate(cfg, command)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return cfg


def connect_for(cfg: BusdiffConfig, command: str) -> dict[str, Any]:
    """Connect to Ray (:func:`busdiff.raycluster.connect`), say what the cluster has, and refuse outputs
    on this machine's own disk when other hosts' workers would write them
    (:func:`busdiff.jobpaths.check_node_local_outputs`); returns the cluster's resources."""
    import ray

    from busdiff.raycluster import connect

    resources = connect(cfg.ray)
    print(f"connected to Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs", flush=True)
    nodes = ray.nodes()
    me = ray.get_runtime_context().get_node_id()  # the driver's node, as the cluster itself names it
    here = next((n["NodeManagerAddress"] for n in nodes if n["NodeID"] == me), "")
    check_node_local_outputs(cfg, command, nodes, here)
    return resources

"""Ray job: the BUSI data-quality report, hashing images in parallel with Ray Data.

    ray job submit --working-dir . -- python jobs/data_check.py DIR --json OUT \
        [--set quality.near_duplicate_distance=4]

Under ``ray job submit`` this joins the cluster; run directly, it starts a local one.
"""

from __future__ import annotations

import argparse
import sys

from busdiff.config import ConfigError, load_config
from busdiff.data.check import run_data_check
from busdiff.data.quality import format_report
from busdiff.data.records import DatasetError
from busdiff.jobpaths import check_job_path
from busdiff.raycluster import connect


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="BUSI folder (Kaggle or manifest layout); local path readable by every node")
    p.add_argument("--json", required=True, help="where to write the report (local path or s3://...)")
    p.add_argument("--config", help="YAML config; its ray, data and quality sections are used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    try:
        check_job_path("DIR", a.dir, output=False)
        check_job_path("--json", a.json, output=True)
        cfg = load_config(a.config, [f"data.root={a.dir}", *a.overrides])
        resources = connect(cfg.ray)
        print(
            f"connected to Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs",
            flush=True,
        )
        report = run_data_check(cfg.data, cfg.quality, json_out=a.json, use_ray=True)
    except (ConfigError, DatasetError, ValueError, OSError) as e:  # input problems, the cluster's refusal
        print(f"data_check: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"report written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

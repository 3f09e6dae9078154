"""Ray job: evaluate synthetic images against real BUSI data -> metrics.json + report.html.

    python jobs/evaluate.py --config jobs/configs/evaluate-local.yaml [--set evaluate.synthetic=DIR]
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate-local.yaml \
        --set evaluate.synthetic=/shared/gen/samples --set data.root=/shared/busi-256

Under ``ray job submit`` this joins the cluster; run directly, it starts a local one. Classifier runs and
feature extraction are Ray tasks with the CPUs/GPUs of ``evaluate.classifier`` / ``evaluate.fid``.
"""

from __future__ import annotations

from busdiff.cli import run_job

if __name__ == "__main__":
    run_job("evaluate")

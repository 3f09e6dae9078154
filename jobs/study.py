"""Ray job: the study (busdiff.study): every configuration fine-tuned, generated and judged, one report.

python jobs/study.py jobs/configs/local.yaml                      # the embedded default, local Ray
ray job submit --working-dir . -- python jobs/study.py jobs/configs/study-sd15-busi.yaml \
    --set study.out=s3://BUCKET/busdiff/study --set data.root=/data/busi-256

Under ``ray job submit`` give study.out as an s3:// URI or an absolute path on shared storage.
Resubmitting the same config skips every finished stage.
"""

from __future__ import annotations

from busdiff.cli import run_job

if __name__ == "__main__":
    run_job("study")

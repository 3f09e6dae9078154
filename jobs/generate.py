"""Ray job: generation at scale (text2img, then img2img refinement) into a resumable sink.

python jobs/generate.py jobs/configs/generate-tiny.yaml [--set generate.count=4 ...]   # local Ray cluster
ray job submit --working-dir . -- python jobs/generate.py jobs/configs/generate-sd15-busi.yaml \
    --set generate.out=s3://BUCKET/busdiff/generated

A rerun with the same config writes only the images the sink lacks (nothing when all are there).
"""

from __future__ import annotations

from busdiff.cli import run_job

if __name__ == "__main__":
    run_job("generate")

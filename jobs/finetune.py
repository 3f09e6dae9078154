"""Ray job: fine-tune LoRA / textual-inversion adapters on Ray Train.

python jobs/finetune.py jobs/configs/finetune-tiny.yaml [--set finetune.lora.steps=20 ...]   # local Ray
ray job submit --working-dir . -- python jobs/finetune.py jobs/configs/sd15-busi.yaml \
    --set finetune.out=s3://BUCKET/busdiff/finetune --set data.root=/data/busi

Under ``ray job submit`` this joins the cluster; give finetune.out as an absolute path on shared storage or
a URI (a relative one would land in the job's temporary working directory). Rerunning with the same
finetune.out resumes from its latest checkpoint.
"""

from __future__ import annotations

from busdiff.cli import run_job

if __name__ == "__main__":
    run_job("finetune")

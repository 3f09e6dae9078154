"""Ray job: the embedded default end to end (phantom data, data check, tiny text2img + img2img grid).

python jobs/demo.py --config jobs/configs/local.yaml          # local Ray cluster started in-process
ray job submit --working-dir . -- python jobs/demo.py --config jobs/configs/local.yaml
"""

from __future__ import annotations

from busdiff.cli import run_job

if __name__ == "__main__":
    run_job("demo")

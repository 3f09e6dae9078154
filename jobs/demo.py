"""Ray job: the embedded default end to end (phantom data, data check, tiny text2img + img2img grid).

python jobs/demo.py --config jobs/configs/local.yaml          # local Ray cluster started in-process
ray job submit --working-dir . -- python jobs/demo.py --config jobs/configs/local.yaml
"""

from __future__ import annotations

import sys

from busdiff.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--config"]:
        args = args[1:]
    sys.exit(main(["demo", *args]))

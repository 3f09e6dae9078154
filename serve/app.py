"""Import path for `serve run serve.app:app` (the embedded default config) and, through
`busdiff.serving.app:app_builder`, for `serve run serve/config.yaml` / `serve deploy`."""

from __future__ import annotations

import os

from busdiff.config import load_config
from busdiff.serving.app import build_app

app = build_app(load_config(os.environ.get("BUSDIFF_CONFIG", "jobs/configs/serve-local.yaml")))

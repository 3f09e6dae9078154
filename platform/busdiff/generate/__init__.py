"""Generation at scale: ``plan`` (rows with stable ids and seeds), ``stages`` (Text2Img / Img2Img callable
classes for Ray Data and Serve), ``sink`` (PNG + parquet journal, resumable), ``pipeline`` (the Ray Data
graph and ``run_generate(cfg)``). Submodules are imported on use: ``prompts`` stays light."""

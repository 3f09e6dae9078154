"""The embedded default end to end: phantom data, the data check on Ray, and a text2img + img2img
sample grid made by the generation pipeline (busdiff.generate: Ray Data actors into a resumable sink)."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from busdiff.config import CLASSES, BusdiffConfig, dump_config
from busdiff.data.busi import load_dataset, read_image
from busdiff.data.check import run_data_check
from busdiff.data.phantom import write_phantom
from busdiff.data.quality import format_report
from busdiff.generate.pipeline import GenerateResult, format_summary, run_generate
from busdiff.generate.plan import build_plan
from busdiff.generate.sink import SAMPLES, Sink
from busdiff.storage import write_text
from busdiff.viz import image_grid


@dataclass
class DemoResult:
    out: Path
    data_report: dict[str, Any]
    phantom_sheet: Path
    sample_grid: Path
    n_samples: int
    seconds: float
    generate: GenerateResult | None = None


def run_demo(cfg: BusdiffConfig) -> DemoResult:
    """Needs a connected Ray cluster (see busdiff.raycluster.connect)."""
    t0 = time.perf_counter()
    plan = build_plan(cfg)  # config errors before any work
    out = Path(cfg.generate.out)  # the demo's run directory is the generation sink (a local path)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump_config(cfg))

    print(f"[1/3] phantom data: {cfg.phantom.n_per_class} per class -> {cfg.data.root}", flush=True)
    write_phantom(cfg.data.root, cfg.phantom.n_per_class, seed=cfg.phantom.seed, size=cfg.phantom.size)
    records = load_dataset(cfg.data.root).records
    sheet_rows = [[read_image(r) for r in records if r.label == c][:6] for c in CLASSES]
    phantom_sheet = out / "phantom.png"
    image_grid(sheet_rows, row_labels=CLASSES).save(phantom_sheet)

    print("[2/3] data check on Ray", flush=True)
    report = run_data_check(cfg.data, cfg.quality, json_out=out / "data_check.json", use_ray=True)
    print(format_report(report), flush=True)

    g = cfg.generate
    print(
        f"[3/3] text2img + img2img: {plan.counts} images, preset {cfg.model.preset}, {g.steps} steps",
        flush=True,
    )
    gen = run_generate(cfg, plan)
    print(format_summary(gen), flush=True)
    sink = Sink(out)
    wanted = set(plan.ids)
    rows = [r for r in sink.read_metadata().to_pylist() if r["id"] in wanted]
    pictures = [
        [sink.read_bytes(r["text2img_path"])] * bool(r["text2img_path"])
        + [sink.read_bytes(f"{SAMPLES}/{r['file_name']}")]
        for r in rows
    ]
    grid = out / "samples.png"
    image_grid(
        [[Image.open(io.BytesIO(b)) for b in row] for row in pictures],
        row_labels=[r["id"] for r in rows],
        col_labels=(["text2img"] if g.keep_text2img or not g.refine else []) + ["img2img"] * g.refine,
    ).save(grid)
    return DemoResult(out, report, phantom_sheet, grid, len(rows), time.perf_counter() - t0, gen)

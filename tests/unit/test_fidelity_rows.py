"""The evaluation's fidelity rows as metrics.json, the summary and report.html carry them."""

from __future__ import annotations

import numpy as np

from busdiff.config import FidelityConfig
from busdiff.evaluate.prdc import METRICS
from busdiff.evaluate.report import _fid_table, _fidelity_intro
from busdiff.evaluate.run import _fidelity_row, summary_lines

SIDE_KEYS = {"fid", "kid", "fid_ci", "kid_ci", *METRICS}
VS_KEYS = {"fid_diff", "fid_diff_ci", "kid_diff", "kid_diff_ci", "p_synthetic_better"}


def _rows(cfg: FidelityConfig) -> list[dict]:
    rng = np.random.default_rng(0)
    syn, held, pool = rng.normal(size=(30, 24)), rng.normal(size=(20, 24)), rng.normal(size=(50, 24))
    return [
        _fidelity_row("benign", syn, held, pool, cfg),
        _fidelity_row("normal", syn[:4], held, pool, cfg),  # 4 synthetic images: no precision etc. at k=5
        _fidelity_row("malignant", syn[:1], held, pool, cfg),
    ]


def test_rows_have_the_study_table_keys_and_the_config_reaches_them():
    cfg = FidelityConfig(bootstrap=50, floor_draws=3, kid_subsets=10)
    ok, small, skipped = _rows(cfg)
    assert set(ok["synthetic_vs_held_out"]) >= SIDE_KEYS and set(ok["floor"]) >= SIDE_KEYS
    assert set(ok["vs_floor"]) >= VS_KEYS and set(ok["vs_floor"]["p_synthetic_better"]) == {"fid", "kid"}
    assert ok["floor"]["draws"] == 3 and ok["synthetic_vs_held_out"]["kid_subsets"] == 10
    assert small["synthetic_vs_held_out"]["precision"] is None
    assert "synthetic 4" in small["synthetic_vs_held_out"]["prdc_skipped"]
    assert skipped["skipped"] == "fewer than 2 images in: synthetic"
    k3 = _fidelity_row(
        "normal",
        *[np.random.default_rng(0).normal(size=(n, 24)) for n in (4, 20, 50)],
        FidelityConfig(bootstrap=0, nearest_k=3, kid_subsets=10),
    )
    assert k3["synthetic_vs_held_out"]["precision"] is not None and k3["vs_floor"]["fid_diff_ci"] is None


def test_summary_and_report_show_the_paired_difference_and_say_what_intervals_mean():
    rows = _rows(FidelityConfig(bootstrap=50, floor_draws=3, kid_subsets=10))
    metrics = {
        "fidelity": {"rows": rows, "paper_protocol": None},
        "leakage": {},
        "memorization": {},
        "classifier": {},
    }
    lines = summary_lines(metrics)
    ok = rows[0]["vs_floor"]
    assert f"{ok['fid_diff']:+.1f} [{ok['fid_diff_ci'][0]:+.1f}, {ok['fid_diff_ci'][1]:+.1f}]" in lines[1]
    assert "skipped: fewer than 2 images in: synthetic" in lines[3]
    table = _fid_table(rows, None)
    assert "FID − floor" in table and "P(synthetic better)" in table
    assert "need more than nearest_k=5 images per set (synthetic 4)" in table
    intro = _fidelity_intro({"floor_draws": 3, "ci_level": 0.95, "bootstrap": 50, "nearest_k": 5})
    assert "50 paired bootstrap replicates" in intro and "k = 5 nearest neighbours" in intro
    assert "torch-fidelity's prc uses k = 3" in intro

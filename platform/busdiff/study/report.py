"""The study's report.html: one self-contained page (images embedded, no scripts, no links) from
study.json's content: the configurations side by side, their samples, memorization, and the published
figures beside, labelled as measured under other protocols."""

from __future__ import annotations

import html
from typing import Any

from PIL import Image

from busdiff.evaluate.report import _CSS, _ci, _f, _img_tag
from busdiff.storage import list_dir, readable
from busdiff.study.plan import StudyPlan
from busdiff.study.results import KEYS, floor_key
from busdiff.viz import image_grid

CLASSIFIER_METRICS = ("balanced_accuracy", "macro_f1", "auc_macro", "malignant_sensitivity")


def _cell(value: Any, floor: Any, digits: int = 1) -> str:
    return f"<td>{_f(value, digits)} <span class=note>({_f(floor, digits)})</span></td>"


def _synthetic_table(rows: list[dict[str, Any]], columns: tuple[str, ...], cell: Any,
                     first: str = "configuration") -> str:
    """One row per synthetic configuration, one ``cell(row, column)`` per column."""
    head = "".join(f"<th>{c}</th>" for c in columns)
    out = [f"<table><tr><th class=l>{first}</th>{head}</tr>"]
    for r in rows:
        if r["synthetic"]:
            cells = "".join(cell(r, c) for c in columns)
            out.append(f"<tr><td class=l>{html.escape(r['name'])}</td>{cells}</tr>")
    out.append("</table>")
    return "".join(out)


def _fidelity_table(rows: list[dict[str, Any]], figure: str, digits: int) -> str:
    return _synthetic_table(
        rows, KEYS, lambda r, k: _cell(r[figure].get(k), r[floor_key(figure)].get(k), digits)
    )


def _diff_table(rows: list[dict[str, Any]], figure: str, digits: int) -> str:
    """``<figure> − floor`` per class with its paired bootstrap interval (evaluation's ``vs_floor``)."""

    def cell(r: dict[str, Any], k: str) -> str:
        d = (r.get("vs_floor") or {}).get(k) or {}
        value, ci = d.get(f"{figure}_diff"), d.get(f"{figure}_diff_ci")
        return f"<td>{_f(value, digits)} <span class=note>{_ci(ci, digits)}</span></td>"

    return _synthetic_table(rows, KEYS, cell)


def _coverage_table(rows: list[dict[str, Any]]) -> str:
    """Precision, recall, density, coverage of all classes together, each beside its floor."""
    return _synthetic_table(
        rows,
        ("precision", "recall", "density", "coverage"),
        lambda r, k: _cell(r[k].get("all"), r[floor_key(k)].get("all"), 3),
        first="configuration (all classes)",
    )


def _mean_std(m: dict[str, Any] | None) -> str:
    if not m or m.get("mean") is None:
        return "–"
    return f"{m['mean']:.3f} ± {m.get('std') or 0:.3f}"


def _classifier_table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{k}</th>" for k in CLASSIFIER_METRICS)
    out = [f"<table><tr><th class=l>configuration</th>{head}<th>Δ balanced accuracy vs real</th></tr>"]
    for r in rows:
        c = r.get("classifier") or {}
        cells = "".join(f"<td>{_mean_std(c.get(k))}</td>" for k in CLASSIFIER_METRICS)
        diff = (c.get("vs_real") or {}).get("balanced_accuracy") or {}
        d = "–" if diff.get("mean_diff") is None else (
            f"{diff['mean_diff']:+.3f} (wins {diff.get('wins', '–')}/{diff.get('n_pairs', '–')})")
        out.append(f"<tr><td class=l>{html.escape(r['name'])}</td>{cells}<td>{d}</td></tr>")
    out.append("</table>")
    return "".join(out)


SEGMENTATION_METRICS = ("dice_benign", "dice_malignant", "dice_lesion", "iou_lesion")


def _segmentation_table(rows: list[dict[str, Any]]) -> str:
    """Test Dice / IoU of the segmentation judge per ControlNet configuration: real-only pairs, and real +
    the configuration's synthetic pairs, with the paired difference in lesion Dice."""
    head = "".join(f"<th>{k}</th>" for k in SEGMENTATION_METRICS)
    out = [f"<table><tr><th class=l>configuration</th><th class=l>training pairs</th>{head}"
           "<th>Δ dice_lesion vs real only</th></tr>"]
    for r in rows:
        for s in (r.get("segmentation") or {}).get("rows", []):
            cells = "".join(f"<td>{_mean_std(s.get(k))}</td>" for k in SEGMENTATION_METRICS)
            diff = (s.get("vs_real_only") or {}).get("dice_lesion") or {}
            d = "–" if diff.get("mean_diff") is None else (
                f"{diff['mean_diff']:+.3f} (wins {diff.get('wins', '–')}/{diff.get('n_pairs', '–')})")
            out.append(f"<tr><td class=l>{html.escape(r['name'])}</td><td class=l>{html.escape(s['arm'])}"
                       f"</td>{cells}<td>{d}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _pngs(folder: str, n: int) -> list[str]:
    listed = list_dir(folder)
    return [f"{folder}/{name}" for name in (listed[0] if listed else []) if name.endswith(".png")][:n]


def _grid(row: dict[str, Any], classes: list[str], n: int) -> Image.Image | None:
    """``n`` images per class; a refined configuration shows each text2img image beside its refinement,
    a ControlNet one each image's mask before it (mask | image, or mask | text2img | refined). The folders
    may be local or in an object store."""
    folder = row["images"].rstrip("/")
    rows = [_pngs(f"{folder}/{c}", n) for c in classes]
    parent, name = folder.rsplit("/", 1)
    before = [d for d in ("masks", "text2img") if (d != "text2img" or name == "samples")
              and list_dir(f"{parent}/{d}") is not None]
    if before:
        rows = [[q for p in r for q in (*(p.replace(f"{folder}/", f"{parent}/{d}/", 1) for d in before), p)]
                for r in rows]
    if not any(rows):
        return None
    images = [[Image.open(readable(p)).convert("RGB") for p in r] for r in rows]
    return image_grid(images, row_labels=classes)


def _memorization_table(rows: list[dict[str, Any]]) -> str:
    out = ["<table><tr><th class=l>configuration</th><th>near-copies of training images</th>"
           "<th>nearest-train cosine, median (real held-out baseline)</th></tr>"]
    for r in rows:
        m = r.get("memorization")
        if not m:
            continue
        cos = ((m.get("synthetic") or {}).get("cosine") or {}).get("median")
        base = ((m.get("real_baseline") or {}).get("cosine") or {}).get("median")
        out.append(f"<tr><td class=l>{html.escape(r['name'])}</td><td>{_f(m.get('n_near_copies'))}</td>"
                   f"<td>{_f(cos, 3)} ({_f(base, 3)})</td></tr>")
    out.append("</table>")
    return "".join(out)


def _published(study: dict[str, Any]) -> str:
    pub = study["published"]
    ours = {r["name"]: r.get("authors_protocol_fid") for r in study["configurations"] if r["synthetic"]}
    p, a = pub["paper"], pub["authors_notebooks"]
    rows = "".join(
        f"<tr><td class=l>{html.escape(k)}</td><td>{_f(v)}</td><td>{_f(ours.get(k))}</td></tr>"
        for k, v in a["fid"].items()
    )
    w = p["workshop_classifier"]
    return (
        "<p class=warn>Published figures, measured under other protocols than busdiff's; they are not "
        "comparable with the table above.</p>"
        f"<p>Paper ({html.escape(p['source'])}; {html.escape(p['protocol'])}): FID "
        + ", ".join(f"{html.escape(k)} {v}" for k, v in p["fid"].items())
        + f"; workshop version: accuracy {w['accuracy'][0]:.1%} → {w['accuracy'][1]:.1%}, macro-F1 "
        f"{w['macro_f1'][0]:.1%} → {w['macro_f1'][1]:.1%}, AUC {w['auc']}.</p>"
        f"<p>The authors' notebooks ({html.escape(a['source'])}; {html.escape(a['protocol'])}), beside "
        "busdiff's FID computed their way on this study's images (all real images against all real images "
        "plus the synthetic ones):</p>"
        f"<table><tr><th class=l>configuration</th><th>authors' notebook FID</th><th>busdiff, their way</th>"
        f"</tr>{rows}</table>"
    )


def render_report(study: dict[str, Any], plan: StudyPlan, per_class: int | None = None) -> str:
    """The whole page; ``per_class`` samples per class in each grid (default: the study's setting)."""
    rows, classes = study["configurations"], list(study["classes"])
    n = per_class or 4
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        f"<title>busdiff study</title><style>{_CSS}</style></head><body>",
        "<h1>busdiff study</h1>",
        f"<p class=note>Base model {html.escape(str(study['base_model']))}; real data "
        f"{html.escape(str(study['data']))}; every configuration judged against the same held-out split(s) "
        f"{html.escape('+'.join(study['held_out_splits']))} with one feature cache. "
        f"{len(plan.runs)} stage runs under {html.escape(plan.out)}.</p>",
        "<h2>Fidelity: FID per class (real-vs-real floor)</h2>",
        "<p>Synthetic images of each configuration against the held-out real images; in brackets the "
        "floor: as many real training images against the same held-out images. A configuration cannot be "
        "expected to beat its floor; judge the gap, not the figure.</p>",
        _fidelity_table(rows, "fid", 1),
        "<h2>FID − floor, with its 95% paired bootstrap interval</h2>",
        "<p>Each bootstrap replicate redraws the held-out images once and scores both the resampled "
        "synthetic set and an equally resampled floor set against that draw. Above 0: farther from the "
        "held-out images than real data of the same size; containing 0: not told apart from real data; "
        "below 0: closer than real data (suspect copies).</p>",
        _diff_table(rows, "fid", 1),
        "<h2>KID per class (floor), and KID − floor</h2>",
        _fidelity_table(rows, "kid", 4),
        _diff_table(rows, "kid", 4),
        "<h2>Precision, recall, density, coverage (floor)</h2>",
        "<p>On the same Inception features (Naeem et al. 2020); per class in each configuration's "
        "evaluation report.</p>",
        _coverage_table(rows),
    ]
    parts += ["<h2>Downstream classifier (test split, mean ± std over seeds)</h2>",
              _classifier_table(rows) if any(r.get("classifier") for r in rows) else
              "<p class=note>Classifier experiments are off (evaluate.classifier.enabled).</p>"]
    if any(r.get("segmentation") for r in rows):
        parts += ["<h2>Segmentation judge (test split, mean ± std over seeds)</h2>",
                  "<p>A U-Net trained on the real train image + mask pairs alone, and on those plus the "
                  "configuration's synthetic pairs (its masks/); Dice and IoU on the real test images.</p>",
                  _segmentation_table(rows)]
    parts.append("<h2>Samples</h2>")
    for r in rows:
        if not r["synthetic"]:
            continue
        grid = _grid(r, classes, n)
        parts.append(f"<h3>{html.escape(r['name'])}</h3>")
        parts.append(_img_tag(grid, f"samples of {r['name']}") if grid else "<p class=note>no images</p>")
    parts += ["<h2>Memorization</h2>", _memorization_table(rows)]
    parts += ["<h2>Published figures (other protocols)</h2>", _published(study)]
    parts.append("</body></html>")
    return "\n".join(parts)

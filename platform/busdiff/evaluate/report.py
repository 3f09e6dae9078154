"""report.html: one self-contained page (images and plots embedded as base64 PNG, no scripts, no links)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from busdiff.evaluate.classifier import SCALARS
from busdiff.evaluate.features import ImageItem, read_rgb
from busdiff.viz import image_grid

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left}.note{color:#555;font-size:.92em}.warn{color:#a40}
img{max-width:100%}.pair{display:inline-block;margin:6px;text-align:center;font-size:.85em}
"""


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def _img_tag(image: Image.Image, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png_b64(image)}">'


def _fig_tag(fig: Any, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 10**-digits or x == 0 else f"{x:.{digits}e}"
    return html.escape(str(x))


def _ci(pair: Sequence[float] | None, digits: int = 2) -> str:
    return "–" if not pair else f"[{_f(pair[0], digits)}, {_f(pair[1], digits)}]"


def sample_grid(
    synthetic: Sequence[ImageItem],
    real: Sequence[ImageItem],
    classes: Sequence[str],
    per_class: int,
    cell: int = 96,
) -> Image.Image:
    """Rows per class: synthetic samples, then real held-out images of the same class for reference."""
    rows, labels = [], []
    for c in classes:
        for name, items in (("synthetic", synthetic), ("real", real)):
            chosen = [it for it in items if it.label == c][:per_class]
            if chosen:
                rows.append([read_rgb(it.path) for it in chosen])
                labels.append(f"{c} {name}")
    if not rows:
        return Image.new("RGB", (cell, cell), "white")
    return image_grid(rows, row_labels=labels, cell=cell)


def _thumb_pair(a: str, b: str, size: int = 128) -> Image.Image:
    sheet = Image.new("RGB", (2 * size + 4, size), "white")
    for k, p in enumerate((a, b)):
        sheet.paste(
            Image.fromarray(read_rgb(p)).resize((size, size), Image.Resampling.BILINEAR), (k * (size + 4), 0)
        )
    return sheet


def _fidelity_plot(rows: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("skipped")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    x = np.arange(len(ok))
    for ax, key, title in ((axes[0], "fid", "FID (lower is closer)"), (axes[1], "kid", "KID")):
        syn = [r["synthetic_vs_held_out"][key] for r in ok]
        ci = [r["synthetic_vs_held_out"][f"{key}_ci"] or [v, v] for r, v in zip(ok, syn, strict=True)]
        flo = [r["floor"][key] for r in ok]
        rng = [r["floor"][f"{key}_range"] for r in ok]
        ax.bar(
            x - 0.2,
            syn,
            0.4,
            label="synthetic vs held-out real",
            yerr=np.abs(np.array([[v - c[0], c[1] - v] for v, c in zip(syn, ci, strict=True)]).T),
            capsize=3,
        )
        ax.bar(
            x + 0.2,
            flo,
            0.4,
            label="real vs real floor (matched n)",
            yerr=np.abs(np.array([[v - c[0], c[1] - v] for v, c in zip(flo, rng, strict=True)]).T),
            capsize=3,
        )
        ax.set_xticks(x, [r["class"] for r in ok])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _classifier_plot(summary: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ratios = [s["ratio"] for s in summary]
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro"):
        mean = [s[m]["mean"] if s[m]["mean"] is not None else np.nan for s in summary]
        std = [s[m]["std"] or 0.0 for s in summary]
        ax.errorbar(ratios, mean, yerr=std, marker="o", capsize=3, label=m)
    ax.set_xlabel("synthetic images per real training image")
    ax.set_ylabel("test score (mean ± std over seeds)")
    ax.set_xticks(ratios)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _memorization_plot(mem: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key in ((axes[0], "cosine"), (axes[1], "ssim")):
        syn = [r[key] for r in mem["rows"]]
        base = [r[key] for r in mem["baseline_rows"]]
        lo, hi = min(syn + base), max(syn + base)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 30)
        ax.hist(base, bins=bins, alpha=0.6, density=True, label="held-out real vs nearest train")
        ax.hist(syn, bins=bins, alpha=0.6, density=True, label="synthetic vs nearest train")
        ax.axvline(mem["thresholds"][key], color="red", ls="--", lw=1, label="near-copy threshold")
        ax.set_title(f"nearest-training-image {key}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fid_table(rows: list[dict[str, Any]], paper: dict[str, Any] | None) -> str:
    head = (
        "<tr><th class=l>class</th><th>n synthetic</th><th>n held-out</th><th>FID</th><th>FID CI</th>"
        "<th>floor FID (n matched)</th><th>floor range</th><th>KID</th><th>KID CI</th><th>floor KID</th>"
        "<th>floor KID range</th></tr>"
    )
    out = [f"<table>{head}"]
    for r in rows:
        if r.get("skipped"):
            out.append(
                f"<tr><td class=l>{_f(r['class'])}</td><td>{r['n_synthetic']}</td><td>{r['n_held_out']}</td>"
                f"<td colspan=8 class='l warn'>skipped: {_f(r['skipped'])}</td></tr>"
            )
            continue
        s, fl = r["synthetic_vs_held_out"], r["floor"]
        n_floor = f"{fl['n_pool_used']}" + ("" if fl["matched"] else " (pool smaller)")
        out.append(
            f"<tr><td class=l>{_f(r['class'])}</td><td>{s['n_a']}</td><td>{s['n_b']}</td>"
            f"<td>{_f(s['fid'])}</td>"
            f"<td>{_ci(s['fid_ci'])}</td><td>{_f(fl['fid'])} ({n_floor})</td><td>{_ci(fl['fid_range'])}</td>"
            f"<td>{_f(s['kid'], 4)}</td><td>{_ci(s['kid_ci'], 4)}</td><td>{_f(fl['kid'], 4)}</td>"
            f"<td>{_ci(fl['kid_range'], 4)}</td></tr>"
        )
    out.append("</table>")
    if paper:
        out.append(
            "<p><b>Paper protocol</b> (all real images vs a folder mixing real training and synthetic "
            "images, "
            "all classes at once: the real half inflates the similarity; shown only to set beside published "
            f"figures): FID {_f(paper['fid'])} {_ci(paper['fid_ci'])}, KID {_f(paper['kid'], 4)} "
            f"{_ci(paper['kid_ci'], 4)} ({paper['n_a']} real vs {paper['n_b']} mixed: "
            f"{paper['mix']['real']} real + {paper['mix']['synthetic']} synthetic).</p>"
        )
    return "\n".join(out)


def _classifier_section(clf: dict[str, Any]) -> str:
    if not clf.get("enabled", True):
        return "<p class=note>Classifier experiments disabled (evaluate.classifier.enabled=false).</p>"
    cfg = clf["config"]
    init = clf.get("init") or {}
    init_txt = (
        f"pretrained weights from {html.escape(str(init.get('file')))} ({init.get('loaded')} tensors "
        f"loaded, head re-initialised)"
        if init.get("kind") == "pretrained"
        else "<b>random initialisation</b> (no pretrained weights given: evaluate.classifier.pretrained)"
    )
    parts = [
        f"<p>{html.escape(cfg['model'])} at {cfg['image_size']} px, {cfg['epochs']} epoch(s), batch "
        f"{cfg['batch_size']}, Adam lr {cfg['lr']:g}, seeds {cfg['seeds']}; {init_txt}. Model selection on "
        f"the validation split by {cfg['select_metric']}; scores on the held-out test split "
        f"(n={clf['n_real']['test']}).</p>"
    ]
    metrics = SCALARS
    head = "".join(f"<th>{m}</th>" for m in metrics)
    rows = [f"<table><tr><th>ratio</th><th>synthetic n</th><th>runs ok / failed</th>{head}</tr>"]
    for s in clf["summary"]:
        cells = "".join(f"<td>{_f(s[m]['mean'], 3)} ± {_f(s[m]['std'], 3)}</td>" for m in metrics)
        rows.append(
            f"<tr><td>{s['ratio']:g}</td><td>{_f(', '.join(map(str, s['n_synthetic'])))}</td>"
            f"<td>{s['n_ok']} / {s['n_failed']}</td>{cells}</tr>"
        )
    rows.append("</table>")
    parts += rows
    paired = [f"<table><tr><th>ratio</th>{head}</tr>"]
    for s in clf["summary"]:
        if s["ratio"] == 0:
            continue
        cells = []
        for m in metrics:
            p = (s.get("vs_real_only") or {}).get(m)
            cells.append(
                "<td>–</td>"
                if not p
                else f"<td>{p['mean_diff']:+.3f} ({p['wins']}↑ {p['losses']}↓"
                + (f", p={p['p_value']:.2f}" if p["p_value"] is not None else "")
                + ")</td>"
            )
        paired.append(f"<tr><td>{s['ratio']:g}</td>{''.join(cells)}</tr>")
    paired.append("</table>")
    parts.append(
        "<p>Paired with real-only (same seed): mean difference, seeds better/worse, paired t-test.</p>"
    )
    parts += paired
    recall_head = "".join(f"<th>{html.escape(c)} recall</th>" for c in clf["classes"])
    rec = [f"<table><tr><th>ratio</th>{recall_head}</tr>"]
    for s in clf["summary"]:
        rec.append(
            f"<tr><td>{s['ratio']:g}</td>"
            + "".join(f"<td>{_f(s['recall'][c], 3)}</td>" for c in clf["classes"])
            + "</tr>"
        )
    rec.append("</table>")
    parts += rec
    failed = [r for r in clf["runs"] if r["status"] != "ok"]
    if failed:
        parts.append("<p class=warn><b>Failed runs</b> (after retries):</p><ul>")
        parts += [
            f"<li>ratio {r['ratio']:g}, seed {r['seed']}: {html.escape(r['error'][:600])}</li>"
            for r in failed
        ]
        parts.append("</ul>")
    shorts = sorted({s for r in clf["runs"] for s in r.get("synthetic_draw", {}).get("short", [])})
    if shorts:
        parts.append(
            "<p class=warn>Too few synthetic images for some ratios (all were used): "
            + html.escape("; ".join(shorts))
            + "</p>"
        )
    if any(s["n_ok"] for s in clf["summary"]):
        parts.append(
            _fig_tag(_classifier_plot([s for s in clf["summary"] if s["n_ok"]]), "classifier scores")
        )
    return "\n".join(parts)


def _memorization_section(mem: dict[str, Any], max_shown: int) -> str:
    if not mem.get("enabled", True):
        return "<p class=note>Memorization audit disabled (evaluate.memorization.enabled=false).</p>"
    t = mem["thresholds"]
    syn, base = mem["synthetic"], mem["real_baseline"]
    parts = [
        "<p>For each synthetic image, the nearest real <i>training</i> image by cosine similarity of "
        "Inception "
        f"features, and the SSIM of that pair ({t['ssim_size']} px grayscale). Baseline: each held-out real "
        "image against the training images (two different real scans).</p>",
        "<table><tr><th class=l>set</th><th>n</th><th>cosine median</th><th>cosine p99</th>"
        "<th>cosine max</th>"
        "<th>SSIM median</th><th>SSIM p99</th><th>SSIM max</th></tr>",
    ]
    for name, d in (("synthetic vs nearest train", syn), ("held-out real vs nearest train", base)):
        c, s = d["cosine"], d["ssim"]
        parts.append(
            f"<tr><td class=l>{name}</td><td>{c['n']}</td><td>{_f(c.get('median'), 3)}</td>"
            f"<td>{_f(c.get('p99'), 3)}</td><td>{_f(c.get('max'), 3)}</td><td>{_f(s.get('median'), 3)}</td>"
            f"<td>{_f(s.get('p99'), 3)}</td><td>{_f(s.get('max'), 3)}</td></tr>"
        )
    parts.append("</table>")
    if "above_real_p99" in mem:
        a = mem["above_real_p99"]
        parts.append(
            f"<p>Synthetic images closer to a training image than 99% of held-out real images: "
            f"{a['cosine']:.1%} by cosine, {a['ssim']:.1%} by SSIM.</p>"
        )
    if mem["rows"]:
        parts.append(_fig_tag(_memorization_plot(mem), "memorization histograms"))
    near = mem["near_copies"]
    parts.append(
        f"<p><b>{len(near)}</b> near-copies (cosine ≥ {t['cosine']:g} or SSIM ≥ {t['ssim']:g})"
        + (
            f"; the {min(len(near), max_shown)} closest (synthetic | nearest real training image):"
            if near and max_shown
            else "."
        )
        + "</p>"
    )
    for r in near[:max_shown]:
        cap = (
            f"{html.escape(r['id'])} ~ {html.escape(r['nearest_id'])}<br>cos {r['cosine']:.3f}, "
            f"SSIM {r['ssim']:.3f}"
        )
        parts.append(
            f"<div class=pair>{_img_tag(_thumb_pair(r['path'], r['nearest_path']), r['id'])}<br>{cap}</div>"
        )
    return "\n".join(parts)


def render_html(metrics: dict[str, Any], grid: Image.Image, max_near_copies: int = 24) -> str:
    """The whole report page from ``metrics`` (metrics.json's content) and the sample grid."""
    inp, fidm, feats = metrics["inputs"], metrics["fidelity"], metrics["features"]
    leak = metrics["leakage"]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        f"<title>busdiff evaluation</title><style>{_CSS}</style></head><body>",
        "<h1>busdiff evaluation report</h1>",
        f"<p class=note>Synthetic: {html.escape(inp['synthetic']['root'])} ({inp['synthetic']['n']} images: "
        f"{html.escape(str(inp['synthetic']['per_class']))}). Real: {html.escape(inp['real']['root'])} "
        f"({inp['real']['layout']} layout); held-out splits "
        f"{html.escape('+'.join(inp['held_out']['splits']))} "
        f"({html.escape(str(inp['held_out']['per_class']))}). Created {html.escape(metrics['created'])}, "
        f"busdiff {html.escape(metrics['busdiff_version'])}, {metrics['seconds']:.0f} s.</p>",
        "<h2>Samples</h2>",
        _img_tag(grid, "sample grid: synthetic and real rows per class"),
        "<h2>Fidelity: FID / KID per class</h2>",
        "<p>Synthetic images of each class against the held-out real images of that class. Beside each "
        "figure, the <b>real-vs-real floor</b>: the same number of real <i>training</i> images (drawn "
        f"{fidm['floor_draws']} times) against the same held-out images; a generator cannot be expected "
        "to do "
        "better than real data at the same sample size. Intervals: "
        f"{fidm['ci_level']:.0%} bootstrap ({fidm['bootstrap']} resamples, recentred) for synthetic figures, "
        "range over draws for floors. KID subset size follows the set sizes.</p>",
        _fid_table(fidm["rows"], fidm.get("paper_protocol")),
    ]
    if any(not r.get("skipped") for r in fidm["rows"]):
        parts.append(_fig_tag(_fidelity_plot(fidm["rows"]), "FID and KID with floors"))
    parts.append(
        f"<p class=note>Features: {html.escape(feats['weights'])}; {feats['computed']} computed, "
        f"{feats['cached']} from the cache ({html.escape(str(feats['cache_dir']))}).</p>"
    )
    parts.append("<h2>Leakage guard</h2>")
    if leak["refused"]:
        parts.append(
            f"<p class=warn>{len(leak['refused'])} real image(s) refused as held-out "
            f"(mode {html.escape(leak['mode'])}): they were trained on, or duplicate a training "
            "image.</p><ul>"
        )
        parts += [
            f"<li>{html.escape(x['id'])}: {html.escape(x['kind'])}: {html.escape(x['reason'])}</li>"
            for x in leak["refused"]
        ]
        parts.append("</ul>")
    else:
        parts.append("<p>No held-out image was trained on or duplicates a training image.</p>")
    if leak["adapters"]:
        parts.append(
            "<p class=note>Adapters checked: "
            + html.escape(
                "; ".join(f"{a['dir']} ({a['n_trained_ids']} trained ids)" for a in leak["adapters"])
            )
            + "</p>"
        )
    else:
        parts.append(
            "<p class=note>No adapter given (evaluate.adapters): held-out images were checked against "
            "the real training split only.</p>"
        )
    parts.append("<h2>Downstream classifier</h2>")
    parts.append(_classifier_section(metrics["classifier"]))
    parts.append("<h2>Memorization audit</h2>")
    parts.append(_memorization_section(metrics["memorization"], max_near_copies))
    parts.append("</body></html>")
    return "\n".join(parts)

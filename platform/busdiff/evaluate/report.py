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
from busdiff.evaluate.prdc import METRICS, NEAREST_K
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
    """Per class: FID and KID minus the floor with the paired interval; precision/recall/density/coverage
    of synthetic (filled) and floor (open)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("skipped")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.5 * len(ok) + 2.2))
    y = np.arange(len(ok))
    for ax, key in ((axes[0], "fid"), (axes[1], "kid")):
        diff = np.array([r["vs_floor"][f"{key}_diff"] for r in ok])
        ci = np.array([r["vs_floor"][f"{key}_diff_ci"] or [d, d] for r, d in zip(ok, diff, strict=True)])
        ax.errorbar(diff, y, xerr=np.clip([diff - ci[:, 0], ci[:, 1] - diff], 0, None), fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=1, ls="--")
        ax.set_yticks(y, [r["class"] for r in ok])
        ax.invert_yaxis()
        ax.set_title(f"{key.upper()} synthetic − floor (< 0: closer than real)", fontsize=9)
    ax = axes[2]
    for m, (name, colour) in enumerate(zip(METRICS, ("C0", "C1", "C2", "C3"), strict=True)):
        yy = y + (m - 1.5) * 0.15
        syn = [r["synthetic_vs_held_out"][name] for r in ok]
        flo = [r["floor"][name] for r in ok]
        ax.plot([np.nan if v is None else v for v in syn], yy, "o", color=colour, label=name)
        ax.plot([np.nan if v is None else v for v in flo], yy, "o", mfc="none", color=colour)
    ax.set_yticks(y, [r["class"] for r in ok])
    ax.invert_yaxis()
    ax.set_title("synthetic (filled) vs floor (open)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
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


def _fidelity_intro(fidm: dict[str, Any]) -> str:
    k = fidm.get("nearest_k", NEAREST_K)
    return (
        "<p>Synthetic images of each class against the held-out real images of that class. Beside each "
        "figure, the <b>real-vs-real floor</b>: as many real <i>training</i> images as there are synthetic "
        f"ones (mean over {fidm['floor_draws']} random draws) against the same held-out images; a generator "
        "cannot be expected to do better than real data at the same sample size. Figures are those of the "
        "full sets; KID's subset size follows the set sizes.</p>"
        f"<p><b>What the intervals mean</b> ({fidm['ci_level']:.0%}, {fidm['bootstrap']} paired bootstrap "
        "replicates). Each replicate redraws the held-out images with replacement once, the synthetic images "
        "with replacement, and for the floor a fresh set of training images of the synthetic count, "
        "resampled the same way; synthetic and floor are scored against that one held-out draw.</p><ul>"
        "<li><b>FID − floor, KID − floor</b>: the interval of the difference over the replicates. The luck "
        "of the held-out draw, and the rise that repeated images give FID, are shared by both sides and "
        "cancel. Wholly above 0: the synthetic images are farther from the held-out images than real images "
        "of the same number; below 0: closer (suspect copies of held-out images); containing 0: not told "
        "apart from real data at this sample size. <b>P(synthetic better)</b>: the share of replicates "
        "in which the synthetic figure is below the floor's.</li>"
        "<li><b>FID range, KID range</b> (each figure alone): where the figure falls over the replicates. "
        "Repeated images raise every replicate's FID, so FID ranges sit above the full-set figure: they show "
        "the spread, and synthetic and floor ranges can be set side by side, but neither is an interval for "
        "a 'true' FID, which at these sizes is dominated by its small-sample bias. KID's replicates leave "
        "out pairs of an image with its own copy and are not shifted.</li>"
        f"<li><b>Precision, recall, density, coverage</b> (Naeem et al. 2020; k = {k} nearest neighbours in "
        "the same Inception features; torch-fidelity's prc uses k = 3, which gives other values): precision, "
        "the share of synthetic images inside some held-out image's k-NN ball (realism); recall, the share "
        "of held-out images inside some synthetic image's ball (diversity); density, about 1 when the sets "
        "are alike and above 1 where synthetic images crowd dense real regions; coverage, the share of "
        "held-out images whose ball holds a synthetic image. No intervals: with repeated images an image "
        "would be its own nearest neighbour.</li></ul>"
    )


def _row_start(r: dict[str, Any]) -> str:
    return f"<tr><td class=l>{_f(r['class'])}</td><td>{r['n_synthetic']}</td><td>{r['n_held_out']}</td>"


def _skipped_row(r: dict[str, Any], span: int) -> str:
    return f"{_row_start(r)}<td colspan={span} class='l warn'>skipped: {_f(r['skipped'])}</td></tr>"


def _p_better(vs: dict[str, Any]) -> str:
    p = vs.get("p_synthetic_better")
    return "–" if not p else f"{_f(p['fid'], 3)} / {_f(p['kid'], 3)}"


def _with_ci(
    value: Any, ci: Sequence[float] | None, digits: int = 2, bold: bool = False, note: str = ""
) -> str:
    """A table cell: the figure (bold: the one to read), then its interval under it."""
    v = f"<b>{_f(value, digits)}</b>" if bold else _f(value, digits)
    return f"<td>{v}{note}<br><span class=note>{_ci(ci, digits)}</span></td>"


def _fid_table(rows: list[dict[str, Any]], paper: dict[str, Any] | None) -> str:
    head = (
        "<tr><th class=l>class</th><th>n synthetic</th><th>n held-out</th><th>FID<br>range</th>"
        "<th>floor FID (n)<br>range</th><th>FID − floor<br>CI</th><th>KID<br>range</th>"
        "<th>floor KID<br>range</th><th>KID − floor<br>CI</th><th>P(synthetic better)<br>FID / KID</th></tr>"
    )
    out = [f"<table>{head}"]
    for r in rows:
        if r.get("skipped"):
            out.append(_skipped_row(r, 7))
            continue
        s, fl, vs = r["synthetic_vs_held_out"], r["floor"], r["vs_floor"]
        n_floor = f" ({fl['n_pool_used']}" + (")" if fl["matched"] else ", pool smaller: not matched)")
        out.append(
            f"{_row_start(r)}{_with_ci(s['fid'], s['fid_ci'])}"
            f"{_with_ci(fl['fid'], fl['fid_ci'], note=n_floor)}"
            f"{_with_ci(vs['fid_diff'], vs['fid_diff_ci'], bold=True)}{_with_ci(s['kid'], s['kid_ci'], 4)}"
            f"{_with_ci(fl['kid'], fl['kid_ci'], 4)}{_with_ci(vs['kid_diff'], vs['kid_diff_ci'], 4, True)}"
            f"<td>{_p_better(vs)}</td></tr>"
        )
    out.append("</table>")
    out.append(
        "<table><tr><th class=l>class</th><th>n synthetic</th><th>n held-out</th>"
        + "".join(f"<th>{m}</th><th>floor</th>" for m in METRICS)
        + "</tr>"
    )
    for r in rows:
        if r.get("skipped"):
            out.append(_skipped_row(r, 2 * len(METRICS)))
            continue
        s, fl = r["synthetic_vs_held_out"], r["floor"]
        cells = "".join(f"<td>{_f(s[m], 3)}</td><td>{_f(fl[m], 3)}</td>" for m in METRICS)
        why = "; ".join(dict.fromkeys(x for x in (s.get("prdc_skipped"), fl.get("prdc_skipped")) if x))
        note = f"<td class='l warn'>{_f(why)}</td>" if why else ""
        out.append(f"{_row_start(r)}{cells}{note}</tr>")
    out.append("</table>")
    if paper:
        out.append(
            "<p><b>Paper protocol</b> (all real images vs a folder mixing real training and synthetic "
            "images, all classes at once: the real half inflates the similarity; shown only to set beside "
            f"published figures, without intervals): FID {_f(paper['fid'])}, KID {_f(paper['kid'], 4)} "
            f"({paper['n_a']} real vs {paper['n_b']} mixed: {paper['mix']['real']} real + "
            f"{paper['mix']['synthetic']} synthetic).</p>"
        )
    return "\n".join(out)


def _classifier_section(clf: dict[str, Any]) -> str:
    from busdiff.evaluate.classifier import REAL_ONLY, rows_of_set

    if not clf.get("enabled", True):
        return "<p class=note>Classifier experiments disabled (evaluate.classifier.enabled=false).</p>"
    cfg = clf["config"]
    init = clf.get("init") or {}
    if init.get("kind") == "inception-frozen":
        hidden = f" ({init.get('hidden')} hidden units)" if init.get("hidden") else ""
        model_txt = (
            f"a {html.escape(str(init.get('head')))} head{hidden} trained on the <b>frozen FID Inception "
            f"network's</b> 2048-d features (ImageNet-trained, offline weights: "
            f"{html.escape(str(init.get('weights')))}), read from the evaluation's feature cache; no flip "
            "augmentation"
        )
    else:
        init_txt = (
            f"pretrained weights from {html.escape(str(init.get('file')))} ({init.get('loaded')} tensors "
            f"loaded, head re-initialised)"
            if init.get("kind") == "pretrained"
            else "<b>random initialisation</b> (no pretrained weights given: evaluate.classifier.pretrained)"
        )
        model_txt = f"{html.escape(cfg['model'])} at {cfg['image_size']} px; {init_txt}"
    protocol = clf.get("protocol") or {"label": "real train + synthetic at ratios"}
    parts = [
        f"<p>{model_txt}. {cfg['epochs']} epoch(s), batch {cfg['batch_size']}, Adam lr {cfg['lr']:g}"
        f"{f', weight decay {wd:g}' if (wd := cfg.get('weight_decay')) else ''}, seeds "
        f"{cfg['seeds']}. Model selection on the validation split by {cfg['select_metric']}; scores on the "
        f"held-out test split (n={clf['n_real']['test']}).</p>",
        f"<p>Protocol: <b>{html.escape(protocol['label'])}</b>. Every synthetic set is paired by seed with "
        "the same real-only runs.</p>",
    ]
    summary = clf["summary"]

    def label(s: dict[str, Any]) -> str:  # the set and arm cells of a summary row
        name, arm = html.escape(s.get("set") or "real only"), html.escape(s.get("arm") or "")
        return f"<td class=l>{name}</td><td class=l>{arm}</td>"

    metrics = SCALARS
    head = "".join(f"<th>{m}</th>" for m in metrics)
    key_head = "<th class=l>synthetic set</th><th class=l>arm</th>"
    counts = "<th>synthetic / real</th><th>synthetic n</th><th>runs ok / failed</th>"
    rows = [f"<table><tr>{key_head}{counts}{head}</tr>"]
    for s in summary:
        cells = "".join(f"<td>{_f(s[m]['mean'], 3)} ± {_f(s[m]['std'], 3)}</td>" for m in metrics)
        rows.append(
            f"<tr>{label(s)}<td>{s['ratio']:g}</td><td>{_f(', '.join(map(str, s['n_synthetic'])))}</td>"
            f"<td>{s['n_ok']} / {s['n_failed']}</td>{cells}</tr>"
        )
    parts += [*rows, "</table>"]
    paired = [f"<table><tr>{key_head}{head}</tr>"]
    for s in summary:
        if s.get("arm") == REAL_ONLY:
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
        paired.append(f"<tr>{label(s)}{''.join(cells)}</tr>")
    parts.append(
        "<p>Paired with real-only (same seed): mean difference, seeds better/worse, paired t-test.</p>"
    )
    parts += [*paired, "</table>"]
    recall_head = "".join(f"<th>{html.escape(c)} recall</th>" for c in clf["classes"])
    rec = [f"<table><tr>{key_head}{recall_head}</tr>"]
    for s in summary:
        rec.append(
            f"<tr>{label(s)}" + "".join(f"<td>{_f(s['recall'][c], 3)}</td>" for c in clf["classes"]) + "</tr>"
        )
    parts += [*rec, "</table>"]

    def run_name(r: dict[str, Any]) -> str:
        return html.escape(f"{r.get('set') or 'real only'} {r.get('arm', '')}, seed {r['seed']}")

    failed = [r for r in clf["runs"] if r["status"] != "ok"]
    if failed:
        parts.append("<p class=warn><b>Failed runs</b> (after retries):</p><ul>")
        parts += [f"<li>{run_name(r)}: {html.escape(r['error'][:600])}</li>" for r in failed]
        parts.append("</ul>")
    shorts = sorted(
        {
            f"{r.get('set')}, {r.get('arm')}: {s}"
            for r in clf["runs"]
            for s in r.get("synthetic_draw", {}).get("short", [])
        }
    )
    if shorts:
        parts.append(
            "<p class=warn>Too few synthetic images (all of the class were used): "
            + html.escape("; ".join(shorts))
            + "</p>"
        )
    for name in clf.get("sets") or [None]:
        shown = [s for s in (rows_of_set(clf, name) if name else summary) if s["n_ok"]]
        if shown:
            parts.append(_fig_tag(_classifier_plot(shown), f"classifier scores {name or ''}"))
    return "\n".join(parts)


def _segmentation_section(seg: dict[str, Any]) -> str:
    """The segmentation judge's table: per arm, test Dice/IoU (mean ± std over seeds) and the paired
    difference in lesion Dice from real only."""
    if not seg.get("enabled"):
        return ("<p class=note>Segmentation judge disabled (evaluate.segmentation.enabled=false; it needs a "
                "corpus with masks: generate.controlnet).</p>")

    def ms(v: dict[str, Any]) -> str:
        return f"{_f(v['mean'], 3)} ± {_f(v['std'], 3)}" if v["std"] is not None else _f(v["mean"], 3)

    cols = ("dice_benign", "dice_malignant", "dice_lesion", "iou_lesion", "normal_false_positive")
    out = [f"<p>{html.escape(seg['model'])}; real pairs {html.escape(str(seg['n_real']))}; "
           f"{seg['n_failed']} failed run(s). normal_false_positive: share of normal test images with any "
           "predicted lesion pixel.</p>",
           "<table><tr><th class=l>arm</th><th>synthetic pairs</th>"
           + "".join(f"<th>{c}</th>" for c in cols)
           + "<th>Δ dice_lesion vs real only (wins/losses)</th></tr>"]
    for r in seg["summary"]:
        vs = (r.get("vs_real_only") or {}).get("dice_lesion")
        d = f"{vs['mean_diff']:+.3f} ({vs['wins']}/{vs['losses']})" if vs else "–"
        out.append(f"<tr><td class=l>{html.escape(r['arm'])}</td>"
                   f"<td>{html.escape(str(r['n_synthetic']))}</td>"
                   + "".join(f"<td>{ms(r[c])}</td>" for c in cols) + f"<td>{d}</td></tr>")
    out.append("</table>")
    return "".join(out)


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


def _listed(items: list[dict[str, Any]]) -> list[str]:
    return ["<ul>", *(f"<li>{html.escape(x['id'])} ({html.escape(str(x.get('split', '')))}): "
                      f"{html.escape(x['kind'])}: {html.escape(x['reason'])}</li>" for x in items), "</ul>"]


def _leakage_section(leak: dict[str, Any]) -> list[str]:
    parts = ["<h2>Leakage guard</h2>"]
    if leak["refused"]:
        parts.append(
            f"<p class=warn>{len(leak['refused'])} real image(s) refused as held-out or val images "
            f"(mode {html.escape(leak['mode'])}): they were trained on, or duplicate a training image.</p>"
        )
        parts += _listed(leak["refused"])
    else:
        parts.append("<p>No held-out or val image was trained on or duplicates a training image.</p>")
    if leak.get("synthetic_refused"):
        parts.append(
            f"<p class=warn>{len(leak['synthetic_refused'])} synthetic image(s) left out: they were refined "
            "from held-out or val images (img2img keeps its source's content).</p>"
        )
        parts += _listed(leak["synthetic_refused"])
    prov = leak.get("provenance")
    if prov:
        parts.append(
            f"<p class=note>Corpus provenance read from {html.escape(prov['plan'])}: adapter "
            f"{html.escape(str(prov['adapter_hash'] or 'none'))} ({prov['n_adapter_trained_ids']} trained "
            f"ids), {prov['n_refined_from_real']} images refined from real ones.</p>"
        )
    else:
        parts.append(
            "<p class=note>The synthetic folder is not a busdiff generation sink (no plan.json beside it): "
            "its adapter and sources are unknown; only evaluate.adapters and the train split were "
            "checked.</p>"
        )
    if leak["adapters"]:
        parts.append(
            "<p class=note>Adapters checked: "
            + html.escape("; ".join(f"{a['name']} ({a['n_trained_ids']} trained ids)"
                                    for a in leak["adapters"]))
            + "</p>"
        )
    return parts


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
        "<h2>Fidelity: FID, KID, precision/recall/density/coverage per class</h2>",
        _fidelity_intro(fidm),
        _fid_table(fidm["rows"], fidm.get("paper_protocol")),
    ]
    if any(not r.get("skipped") for r in fidm["rows"]):
        parts.append(_fig_tag(_fidelity_plot(fidm["rows"]), "FID and KID minus their floors, precision etc."))
    parts.append(
        f"<p class=note>Features: {html.escape(feats['weights'])}; {feats['computed']} computed, "
        f"{feats['cached']} from the cache ({html.escape(str(feats['cache_dir']))}).</p>"
    )
    parts += _leakage_section(leak)
    parts.append("<h2>Downstream classifier</h2>")
    parts.append(_classifier_section(metrics["classifier"]))
    parts.append("<h2>Segmentation judge</h2>")
    parts.append(_segmentation_section(metrics.get("segmentation") or {}))
    parts.append("<h2>Memorization audit</h2>")
    parts.append(_memorization_section(metrics["memorization"], max_near_copies))
    parts.append("</body></html>")
    return "\n".join(parts)

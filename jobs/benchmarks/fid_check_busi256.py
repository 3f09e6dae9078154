"""Check: busdiff's FID/KID on busi-256 against REFERENCE.md, and the real-vs-real floors of busi-256.

    python jobs/benchmarks/fid_check_busi256.py [--root ../shared/datasets/busi-256] [--device cpu|cuda]

1. The three reference rows of REFERENCE.md (torch-fidelity 0.4.0, KID subset 50): train vs test 77.95,
   benign vs malignant 91.22, benign train vs benign test 108.09; passes when every FID is within 1%.
2. Precision/recall on the same features equal torch-fidelity's prc (k=3; input1 generated, input2 real),
   train standing in for generated, test real.
3. Floors: for each class (and all), n real training images drawn 10 times against the real test images,
   for n in 25, 50, 100 and the whole pool; the figure a perfect generator would get at that n: FID, KID,
   precision/recall/density/coverage (k=5).
4. The paired bootstrap on real data: val images standing in for synthetic ones, per class, against the
   train floor (val and train are one distribution: the FID - floor intervals should hold 0), with its
   time for the default replicates.
5. Nearest-neighbour baseline for the memorization audit: each test image's nearest training image.

Inception on ~780 images takes ~2 minutes on a 2-core CPU the first time; features are then cached
(--cache-dir), so a rerun takes seconds. Writes runs/benchmarks/fid_check_busi256.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from busdiff.evaluate.compare import device_name
from busdiff.evaluate.features import FeatureExtractor
from busdiff.evaluate.fidelity import DEFAULT_BOOTSTRAP, compare, fidelity_row, floor
from busdiff.evaluate.inception import resolve_weights
from busdiff.evaluate.inputs import item_of, real_records, select
from busdiff.evaluate.memorization import audit
from busdiff.evaluate.prdc import METRICS, prdc
from busdiff.storage import write_text

REPO = Path(__file__).resolve().parents[2]
REFERENCE = [  # (name, A selection, B selection, FID, KID mean, KID std over subsets) from REFERENCE.md
    ("real train vs real test (all classes)", (["train"], None), (["test"], None), 77.95, 0.0010, 0.0031),
    (
        "real benign vs real malignant (all splits)",
        (None, ["benign"]),
        (None, ["malignant"]),
        91.22,
        0.0187,
        0.0052,
    ),
    (
        "real benign train vs real benign test",
        (["train"], ["benign"]),
        (["test"], ["benign"]),
        108.09,
        0.0024,
        0.0037,
    ),
]
KID_SUBSETS = 100


def kid_agrees(kid: float, ref: float, ref_std: float, subsets: int = KID_SUBSETS) -> bool:
    """Both KIDs are means over ``subsets`` random subsets: they agree when within 3 standard errors of
    the mean (std / sqrt(subsets)) of each other, torch-fidelity's subsets being other random draws."""
    return abs(kid - ref) <= 3 * ref_std / subsets**0.5


def _ci(pair: list[float], fmt: str) -> str:
    return f"[{pair[0]:{fmt}}, {pair[1]:{fmt}}]"


def _prc_check(result: dict, generated, real, k: int = 3) -> bool:
    """Our precision/recall against torch-fidelity's prc on the same features (input1 generated)."""
    import torch
    from torch_fidelity.metric_prc import prc_features_to_metric

    ours = prdc(real, generated, nearest_k=k)
    tf = prc_features_to_metric(
        torch.from_numpy(generated), torch.from_numpy(real), prc_neighborhood=k, prc_batch_size=10000,
        save_cpu_ram=False, verbose=False,
    )
    ok = abs(ours["precision"] - tf["precision"]) < 1e-6 and abs(ours["recall"] - tf["recall"]) < 1e-6
    result["prc_check"] = {
        "k": k, **ours, "tf_precision": tf["precision"], "tf_recall": tf["recall"], "pass": ok
    }
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "busi-256"))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument("--inception-weights", default="auto")
    p.add_argument("--tolerance", type=float, default=0.01, help="relative FID tolerance")
    p.add_argument("--out", default="runs/benchmarks/fid_check_busi256.json")
    a = p.parse_args()

    t0 = time.perf_counter()
    records = real_records(a.root)
    weights = resolve_weights(a.inception_weights, a.cache_dir)
    dev = device_name(a.device)
    ext = FeatureExtractor(weights, a.cache_dir, a.inception_weights, dev, batch_size=32)
    items = [item_of(r) for r in records]
    feats = ext.features(items, "busi-256")
    index = {it.id: i for i, it in enumerate(items)}

    def pick(splits, classes):
        chosen = select(records, splits, classes)
        return feats[[index[r.id] for r in chosen]], chosen

    result: dict = {"root": a.root, "device": dev, "weights": weights.source, "checks": [], "floors": []}
    ok_all = True
    for name, (sa, ca), (sb, cb), ref_fid, ref_kid, ref_kid_std in REFERENCE:
        fa, _ = pick(sa, ca)
        fb, _ = pick(sb, cb)
        r = compare(fa, fb, kid_subset=50, kid_subsets=KID_SUBSETS, bootstrap=200)
        rel = abs(r["fid"] - ref_fid) / ref_fid
        kid_ok = kid_agrees(r["kid"], ref_kid, ref_kid_std)
        ok = rel <= a.tolerance and kid_ok
        ok_all &= ok
        result["checks"].append(
            {
                "name": name,
                "n_a": len(fa),
                "n_b": len(fb),
                "fid": r["fid"],
                "fid_ci": r["fid_ci"],
                "reference_fid": ref_fid,
                "relative_error": rel,
                "kid": r["kid"],
                "kid_std": r["kid_std"],
                "reference_kid": ref_kid,
                "kid_tolerance": round(3 * ref_kid_std / KID_SUBSETS**0.5, 5),
                "kid_pass": kid_ok,
                "pass": ok,
            }
        )

    ok_all &= _prc_check(result, pick(["train"], None)[0], pick(["test"], None)[0])

    classes = ["benign", "malignant", "normal", None]
    for label in classes:
        pool, _ = pick(["train"], [label] if label else None)
        held, _ = pick(["test"], [label] if label else None)
        for n in sorted({25, 50, 100, len(pool)}):
            if n > len(pool):
                continue
            fl = floor(pool, held, n, draws=10, kid_subset=None)
            result["floors"].append({"class": label or "all", "n": n, "n_test": len(held), **fl})

    t1 = time.perf_counter()
    result["paired_val_as_synthetic"] = []
    for label in classes:
        sel = [label] if label else None
        row = fidelity_row(pick(["val"], sel)[0], pick(["test"], sel)[0], pick(["train"], sel)[0])
        result["paired_val_as_synthetic"].append({"class": label or "all", **row})
    result["paired_seconds"] = round(time.perf_counter() - t1, 1)

    train_f, train_r = pick(["train"], None)
    test_f, test_r = pick(["test"], None)
    tr, te = [item_of(r) for r in train_r], [item_of(r) for r in test_r]
    mem = audit(te[:0], test_f[:0], tr, train_f, te, test_f, ssim_size=128)
    result["nn_baseline"] = mem["real_baseline"]
    result["nn_top"] = sorted(mem["baseline_rows"], key=lambda r: -r["ssim"])[:5]
    s = ext.stats
    result["features"] = {
        "computed": s.n_computed,
        "cached": s.n_cached,
        "seconds": round(s.seconds, 1),
        "images_per_s": s.images_per_s,
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["pass"] = ok_all
    write_text(a.out, json.dumps(result, indent=2) + "\n")

    print(f"{'check':<45} {'n_a':>4} {'n_b':>4} {'FID':>8} {'ref':>7} {'err':>6} {'KID':>8} {'ref':>7}")
    for c in result["checks"]:
        print(
            f"{c['name']:<45} {c['n_a']:>4} {c['n_b']:>4} {c['fid']:>8.2f} {c['reference_fid']:>7.2f} "
            f"{c['relative_error']:>6.2%} {c['kid']:>8.4f} {c['reference_kid']:>7.4f} "
            f"{'ok' if c['pass'] else 'FAIL'}"
        )
    c = result["prc_check"]
    print(
        f"\nprecision/recall, train as generated vs test (k=3): ours {c['precision']:.4f}/{c['recall']:.4f}, "
        f"torch-fidelity prc {c['tf_precision']:.4f}/{c['tf_recall']:.4f} {'ok' if c['pass'] else 'FAIL'}"
    )
    print("\nreal-vs-real floors (n train images, 10 draws, vs all test images of the class; k=5)")
    print(
        f"{'class':<10} {'n':>4} {'n_test':>6} {'FID':>8} {'± std':>6} {'KID':>8} {'± std':>7} "
        f"{'prec':>5} {'rec':>5} {'dens':>5} {'cov':>5}"
    )
    for f in result["floors"]:
        print(
            f"{f['class']:<10} {f['n_pool_used']:>4} {f['n_test']:>6} {f['fid']:>8.2f} {f['fid_std']:>6.2f} "
            f"{f['kid']:>8.4f} {f['kid_std']:>7.4f} " + " ".join(f"{f[m]:>5.3f}" for m in METRICS)
        )
    print(
        f"\npaired bootstrap, val as 'synthetic' vs test, floor from train ({DEFAULT_BOOTSTRAP} replicates, "
        f"{result['paired_seconds']} s)"
    )
    print(f"{'class':<10} {'n_val':>5} {'n_test':>6} {'FID-floor':>9} {'95% CI':<16} {'KID-floor':>9} 95% CI")
    for r in result["paired_val_as_synthetic"]:
        v, n = r["vs_floor"], r["synthetic_vs_held_out"]
        print(
            f"{r['class']:<10} {n['n_a']:>5} {n['n_b']:>6} {v['fid_diff']:>+9.2f} "
            f"{_ci(v['fid_diff_ci'], '+.1f'):<16} {v['kid_diff']:>+9.4f} {_ci(v['kid_diff_ci'], '+.4f')}"
        )
    b = result["nn_baseline"]
    print(
        f"\nnearest training image of each test image: cosine median {b['cosine']['median']:.3f} "
        f"p99 {b['cosine']['p99']:.3f} max {b['cosine']['max']:.3f}; SSIM median {b['ssim']['median']:.3f} "
        f"p99 {b['ssim']['p99']:.3f} max {b['ssim']['max']:.3f}"
    )
    print(f"features: {s.n_computed} computed, {s.n_cached} cached; {result['seconds']} s; -> {a.out}")
    print("PASS" if ok_all else "FAIL")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())

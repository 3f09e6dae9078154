"""Check: busdiff's FID/KID on busi-256 against REFERENCE.md, and the real-vs-real floors of busi-256.

    python jobs/benchmarks/fid_check_busi256.py [--root ../shared/datasets/busi-256] [--device cpu|cuda]

1. The three reference rows of REFERENCE.md (torch-fidelity 0.4.0, KID subset 50): train vs test 77.95,
   benign vs malignant 91.22, benign train vs benign test 108.09; passes when every FID is within 1%.
2. Floors: for each class (and all), n real training images drawn 10 times against the real test images,
   for n in 25, 50, 100 and the whole pool; the figure a perfect generator would get at that n.
3. Nearest-neighbour baseline for the memorization audit: each test image's nearest training image.

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
from busdiff.evaluate.fidelity import compare, floor
from busdiff.evaluate.inception import resolve_weights
from busdiff.evaluate.inputs import item_of, real_records, select
from busdiff.evaluate.memorization import audit
from busdiff.storage import write_text

REPO = Path(__file__).resolve().parents[2]
REFERENCE = [  # (name, A selection, B selection, FID, KID mean) from REFERENCE.md
    ("real train vs real test (all classes)", (["train"], None), (["test"], None), 77.95, 0.0010),
    ("real benign vs real malignant (all splits)", (None, ["benign"]), (None, ["malignant"]), 91.22, 0.0187),
    (
        "real benign train vs real benign test",
        (["train"], ["benign"]),
        (["test"], ["benign"]),
        108.09,
        0.0024,
    ),
]


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
    for name, (sa, ca), (sb, cb), ref_fid, ref_kid in REFERENCE:
        fa, _ = pick(sa, ca)
        fb, _ = pick(sb, cb)
        r = compare(fa, fb, kid_subset=50, kid_subsets=100, bootstrap=200)
        rel = abs(r["fid"] - ref_fid) / ref_fid
        ok = rel <= a.tolerance
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
                "pass": ok,
            }
        )

    for label in ["benign", "malignant", "normal", None]:
        pool, _ = pick(["train"], [label] if label else None)
        held, _ = pick(["test"], [label] if label else None)
        for n in sorted({25, 50, 100, len(pool)}):
            if n > len(pool):
                continue
            fl = floor(pool, held, n, draws=10, kid_subset=None)
            result["floors"].append({"class": label or "all", "n": n, "n_test": len(held), **fl})

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
    print("\nreal-vs-real floors (n train images, 10 draws, vs all test images of the class)")
    print(f"{'class':<10} {'n':>4} {'n_test':>6} {'FID':>8} {'± std':>6} {'KID':>8} {'± std':>7}")
    for f in result["floors"]:
        print(
            f"{f['class']:<10} {f['n_pool_used']:>4} {f['n_test']:>6} {f['fid']:>8.2f} {f['fid_std']:>6.2f} "
            f"{f['kid']:>8.4f} {f['kid_std']:>7.4f}"
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

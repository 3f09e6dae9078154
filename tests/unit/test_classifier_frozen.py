"""The inception-frozen classifier: a head on real, cached FID Inception features learns a separable toy
problem, through the same content-keyed cache as FID, seeded like the timm models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from busdiff.config import ClassifierConfig
from busdiff.evaluate.classifier import FeatureHead, train_run
from busdiff.evaluate.features import FeatureExtractor, ImageItem
from tests.unit.evaluate_fixture import shared_weights

CLASSES = ["benign", "malignant", "normal"]
SPLITS = {"train": 5, "val": 2, "test": 3, "syn": 3}  # images per class


def _toy(root, split, n, seed):
    """Class 0: horizontal stripes, 1: vertical stripes, 2: a bright disc; random period, phase, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    items = []
    for k, c in enumerate(CLASSES):
        for i in range(n):
            period, phase = rng.uniform(6, 12), rng.uniform(0, 6)
            if k < 2:
                img = 128 + 100 * np.sin(2 * np.pi * ((yy, xx)[k] + phase) / period)
            else:
                cy, cx = rng.uniform(20, 44, 2)
                img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(100, 300), 230.0, 40.0)
            img = np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)
            path = root / f"{split}_{c}_{i}.png"
            Image.fromarray(img).save(path)
            items.append(ImageItem(f"{split}/{c}/{i}", str(path), c))
    return items


@pytest.fixture(scope="module")
def toy_features(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("toy")
    sets = {s: _toy(root, s, n, seed) for seed, (s, n) in enumerate(SPLITS.items())}
    cache = root / "cache"
    first = FeatureExtractor(shared_weights(), cache, device="cpu")
    feats = first.features_of_sets(sets)
    again = FeatureExtractor(shared_weights(), cache, device="cpu")
    cached = again.features_of_sets(sets)
    arrays = {f"{s}_x": feats[s] for s in sets}
    arrays |= {f"{s}_y": np.array([CLASSES.index(it.label) for it in v]) for s, v in sets.items()}
    return arrays, first.stats, again.stats, cached


def _spec(**kw):
    spec = {
        "model": ClassifierConfig.FROZEN,
        "pretrained": None,
        "head": "linear",
        "epochs": 15,
        "batch_size": 8,
        "lr": 1e-3,
        "seed": 0,
        "ratio": 0.5,
        "classes": CLASSES,
        "select_metric": "balanced_accuracy",
        "device": "cpu",
        "threads": 1,
        "syn_index": [0, 4, 8],
        "features": {"extractor": "toy"},
    }
    return spec | kw


def test_features_are_the_fid_cache_s_own(toy_features):
    arrays, first, again, cached = toy_features
    n = sum(SPLITS.values()) * len(CLASSES)
    assert first.n_computed == n and again.n_computed == 0 and again.n_cached == n  # one network pass
    assert first.extractor_id == again.extractor_id and first.extractor_id.startswith("inception2048-")
    np.testing.assert_array_equal(cached["train"], arrays["train_x"])
    assert arrays["train_x"].shape == (15, 2048)


def test_the_frozen_head_learns_a_separable_problem(toy_features):
    arrays, *_ = toy_features
    res = train_run(_spec(), arrays)
    assert res["status"] == "ok" and res["n_train_synthetic"] == 3 and res["test"]["n"] == 9
    assert res["test"]["balanced_accuracy"] == 1.0 and res["test"]["auc_macro"] == 1.0
    assert res["init"] == {"kind": "inception-frozen", "head": "linear", "hidden": None, "extractor": "toy"}
    vals = [c["val"] for c in res["curve"]]
    assert res["best_epoch"] == int(np.argmax(vals)) and res["val_best"] == max(vals)
    assert res["curve"][-1]["loss"] < res["curve"][0]["loss"]  # it trains
    mlp = train_run(_spec(head="mlp", head_hidden=32), arrays)
    assert mlp["init"]["hidden"] == 32 and mlp["test"]["balanced_accuracy"] == 1.0


def test_seeds_decide_the_head_as_for_timm_models(toy_features):
    arrays, *_ = toy_features
    a, b, c = (train_run(_spec(seed=s, epochs=3), arrays) for s in (0, 0, 1))
    assert a["curve"] == b["curve"] and a["test"] == b["test"]  # the same seed, the same run
    assert [x["loss"] for x in a["curve"]] != [x["loss"] for x in c["curve"]]


def test_head_standardises_by_the_training_features():
    x = np.random.default_rng(0).normal(5.0, 3.0, (50, 4)).astype(np.float32)
    head = FeatureHead(x, 3)
    z = (head.mean.numpy(), head.scale.numpy())
    np.testing.assert_allclose(z[0], x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(z[1], x.std(0), rtol=1e-5)
    with pytest.raises(ValueError, match="feature arrays"):
        train_run(
            _spec(syn_index=[]),
            {
                **{f"{s}_x": np.zeros((3, 8, 8, 3), np.uint8) for s in SPLITS},
                **{f"{s}_y": np.arange(3) for s in SPLITS},
            },
        )

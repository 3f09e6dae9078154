"""Mask-conditioned generation without Ray: the plan gives each image a train-split mask and a seeded
transform, the transforms keep masks binary and move them as drawn, and the stages' ControlNet makes the
mask shape the image (the preset ControlNet of the tiny base)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from busdiff.config import ConfigError, MaskTransformConfig, load_config
from busdiff.data.busi import load_dataset
from busdiff.data.phantom import write_phantom
from busdiff.data.splits import assign_splits
from busdiff.generate.masks import control_image, draw_transform, transform_mask
from busdiff.generate.plan import build_plan

CONTROL = ["generate.controlnet.model=preset", "generate.size=32", "generate.steps=2",
           "generate.refine_steps=4", "generate.strength=0.5"]


@pytest.fixture(scope="module")
def busi(tmp_path_factory):
    root = tmp_path_factory.mktemp("busi")
    write_phantom(root, 6, seed=3, size=64)
    return root


def _cfg(root, *sets):
    return load_config(None, ["model.preset=tiny", "model.device=cpu", f"data.root={root}", *CONTROL, *sets])


def _disc(n=64, r=10, at=(32, 32)):
    yy, xx = np.mgrid[:n, :n]
    return (((yy - at[0]) ** 2 + (xx - at[1]) ** 2) <= r * r).astype(np.uint8) * 255


def test_each_image_takes_a_train_mask_of_its_class_and_a_transform_from_its_seed(busi):
    t = "generate.controlnet.transform"
    plan = build_plan(_cfg(busi, "generate.count=5", f"{t}.degrees=30", f"{t}.elastic_alpha=2"))
    split = {r.id: r for r in assign_splits(load_dataset(busi).records, load_config(None, []).data.split)}
    for row in plan.rows:
        if row["label"] == "normal":
            assert row["condition_id"] == "" and row["mask_source"] == "[]" and row["controlled"]
            continue
        rec = split[row["condition_id"]]
        assert rec.split == "train" and rec.label == row["label"]  # never a held-out patient's lesion
        assert json.loads(row["mask_source"]) == [str(p) for p in rec.mask_paths]
        tr = json.loads(row["mask_transform"])
        assert tr == draw_transform(MaskTransformConfig(degrees=30, elastic_alpha=2), row["seed"])
        assert -30 <= tr["angle"] <= 30
    assert plan.recipe["controlnet"]["model"] == "preset:tiny"
    assert plan.provenance()["conditions"] == {r["id"]: r["condition_id"] for r in plan.rows
                                              if r["condition_id"]}
    # a grown count keeps every earlier image's mask and transform (and the recipe: the sink resumes)
    grown = build_plan(_cfg(busi, "generate.count=7", f"{t}.degrees=30", f"{t}.elastic_alpha=2"))
    assert grown.recipe_hash == plan.recipe_hash
    before = {r["id"]: r for r in plan.rows}
    assert all(r == before[r["id"]] for r in grown.rows if r["id"] in before)


def test_normal_images_without_controlnet_and_plans_without_it_unchanged(busi):
    plan = build_plan(_cfg(busi, "generate.count=2", "generate.controlnet.normal=none"))
    assert [r["controlled"] for r in plan.rows if r["label"] == "normal"] == [False, False]
    plain = build_plan(load_config(None, ["model.preset=tiny", *CONTROL[1:], "generate.count=2"]))
    assert "controlnet" not in plain.recipe and "condition_id" not in plain.rows[0]


def test_a_class_without_train_masks_is_refused_naming_the_field(tmp_path):
    write_phantom(tmp_path / "busi", 4, seed=1, size=64)
    for m in (tmp_path / "busi").rglob("*_mask*.png"):
        if "malignant" in m.name:
            m.unlink()
    with pytest.raises(ConfigError, match=r"generate.controlnet.masks=.*no malignant image with a mask"):
        build_plan(_cfg(tmp_path / "busi", "generate.count=1", "data.skip_bad=true"))


def test_transforms_keep_a_binary_mask_and_move_it_as_drawn():
    disc = _disc()
    ident = draw_transform(MaskTransformConfig(), seed=5)
    assert np.array_equal(transform_mask(disc, ident), disc)
    moved = transform_mask(disc, {**ident, "translate": [0.25, 0.0]})  # x by a quarter of 64 px
    ys, xs = np.nonzero(moved)
    assert abs(xs.mean() - 48) < 0.5 and abs(ys.mean() - 32) < 0.5
    zoomed = transform_mask(disc, {**ident, "scale": 1.5})
    assert abs((zoomed > 0).sum() / (disc > 0).sum() - 2.25) < 0.2
    bent = transform_mask(disc, {**ident, "elastic_alpha": 4.0, "elastic_sigma": 0.1})
    assert set(np.unique(bent)) <= {0, 255} and not np.array_equal(bent, disc)
    assert abs((bent > 0).sum() / (disc > 0).sum() - 1) < 0.3  # deformed, not destroyed


def test_canny_conditioning_is_the_masks_outline():
    edges = control_image(_disc(), "canny")
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) <= {0, 255}
    yy, xx = np.nonzero(edges[:, :, 0])
    radius = np.hypot(yy - 32, xx - 32)
    assert radius.min() > 8 and radius.max() < 12  # on the circle of radius 10, nothing inside or out
    assert np.array_equal(control_image(_disc(), "mask")[:, :, 1], _disc())


def test_the_mask_shapes_the_image_and_uncontrolled_rows_match_the_plain_pipeline():
    import torch

    from busdiff.generate.stages import Img2Img, Text2Img

    cfg = load_config(None, ["model.preset=tiny", "model.device=cpu"]).model
    control = dict(model="preset", conditioning="canny", scale=1.0)
    t2i = Text2Img(cfg, steps=2, guidance=1.0, size=32, controlnet=control)
    plain = Text2Img(cfg, steps=2, guidance=1.0, size=32)
    masks = np.stack([_disc(32, 6, (16, 16)), _disc(32, 6, (8, 24)), _disc(32, 6, (16, 16))])
    batch = {"id": np.array(["a", "b", "c"]), "label": np.array(["benign"] * 3),
             "prompt": np.array(["p"] * 3), "seed": np.array([1, 1, 1]),
             "controlled": np.array([True, True, False]), "mask": masks}
    torch.manual_seed(0)
    out = t2i(batch)["t2i"]
    assert not np.array_equal(out[0], out[1])  # same seed and prompt, another mask: another image
    ref = plain({k: v[2:] for k, v in batch.items()})["t2i"]
    assert np.array_equal(out[2], ref[0])  # the uncontrolled row as without the ControlNet
    img = Img2Img(cfg, steps=4, guidance=1.0, strength=0.5, controlnet=control)
    refined = img({**batch, "t2i": out, "refine_seed": np.array([2, 2, 2])})["refined"]
    assert refined.shape == out.shape and not np.array_equal(refined[0], refined[1])


def test_what_a_controlnet_cannot_do_is_refused_naming_the_fields():
    with pytest.raises(ConfigError, match="generate.handoff=image"):
        load_config(None, ["generate.controlnet.model=preset", "generate.handoff=latent"])
    with pytest.raises(ConfigError, match="not with generate.source"):
        load_config(None, ["generate.controlnet.model=preset", "generate.source=/data/busi"])
    with pytest.raises(ConfigError, match="0 < lo <= hi"):
        load_config(None, ["generate.controlnet.transform.scale=[1.2, 0.8]"])

"""run_evaluate without Ray (classifier off): classes missing on one side, splits, leakage mode."""

from __future__ import annotations

import json
import shutil

import pytest

from busdiff.config import load_config
from busdiff.evaluate.inputs import InputError, real_records, select
from busdiff.evaluate.leakage import LeakageError
from busdiff.evaluate.run import run_evaluate
from tests.unit.evaluate_fixture import real_phantom, shared_cache_dir, synthetic_folder


def _cfg(tmp_path, real, syn, *extra):
    return load_config(
        None,
        [
            f"data.root={real}",
            f"evaluate.synthetic={syn}",
            f"evaluate.out={tmp_path / 'out'}",
            f"evaluate.fid.cache_dir={shared_cache_dir()}",
            "evaluate.fid.device=cpu",
            "evaluate.fid.bootstrap=20",
            "evaluate.fid.floor_draws=2",
            "evaluate.classifier.enabled=false",
            "evaluate.memorization.ssim_size=32",
            *extra,
        ],
    )


def test_a_class_missing_on_one_side_is_reported_not_fatal(tmp_path):
    real = real_phantom(tmp_path / "busi", 14)
    syn = synthetic_folder(tmp_path / "samples", 3)
    shutil.rmtree(syn / "normal")  # no synthetic normal images at all
    for p in sorted((syn / "malignant").iterdir())[1:]:  # a single malignant one
        p.unlink()
    res = run_evaluate(_cfg(tmp_path, real, syn))
    rows = {r["class"]: r for r in res.metrics["fidelity"]["rows"]}
    assert "synthetic_vs_held_out" in rows["benign"] and "synthetic_vs_held_out" in rows["all"]
    assert rows["malignant"]["skipped"] == "fewer than 2 images in: synthetic"
    assert (
        rows["normal"]["skipped"] == "fewer than 2 images in: synthetic"
        and rows["normal"]["n_synthetic"] == 0
    )
    assert "skipped: fewer than 2 images in: synthetic" in (tmp_path / "out" / "report.html").read_text()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["classifier"] == {"enabled": False}


def test_bad_splits_and_leaks_stop_before_any_feature_work(tmp_path):
    real = real_phantom(tmp_path / "busi", 6)
    syn = synthetic_folder(tmp_path / "samples", 1)
    with pytest.raises(
        InputError, match=r"no images in split\(s\) holdout \(present: test 3, train 12, val 3\)"
    ):
        run_evaluate(_cfg(tmp_path, real, syn, "evaluate.held_out_splits=[holdout]"))
    # a held-out image that is a byte copy of a training image: leakage=error names both
    recs = real_records(real)
    train, test = select(recs, ["train"]), select(recs, ["test"])
    shutil.copy(train[0].image_path, test[0].image_path)
    with pytest.raises(
        LeakageError, match=f"{test[0].id}: exact duplicate: identical bytes to {train[0].id}"
    ):
        run_evaluate(_cfg(tmp_path, real, syn, "evaluate.leakage=error"))
    assert not (tmp_path / "out").exists()


def test_val_images_the_adapter_saw_are_refused_too(tmp_path):
    from tests.unit.evaluate_fixture import adapter_json_only

    real = real_phantom(tmp_path / "busi", 14)
    syn = synthetic_folder(tmp_path / "samples", 2)
    val = select(real_records(real), ["val"])
    adapter = adapter_json_only(tmp_path / "adapter", [val[0].id])
    res = run_evaluate(_cfg(tmp_path, real, syn, f"evaluate.adapters=[{adapter}]"))
    refused = {x["id"]: x for x in res.metrics["leakage"]["refused"]}
    assert refused[val[0].id]["split"] == "val" and "trained on by adapter" in refused[val[0].id]["reason"]
    assert res.metrics["inputs"]["val"]["n"] == len(val) - 1


def _sink_from_plan(tmp_path, *sets):
    """A generation sink's samples/ and plan.json, as run_generate writes them, from the real plan of
    ``sets`` (the images are stand-ins: the guard reads provenance, not pixels)."""
    from busdiff.generate.plan import build_plan

    plan = build_plan(load_config(None, ["generate.count=4", *sets]))
    stand_in = synthetic_folder(tmp_path / "stand-in", 14)
    pngs = {c: sorted((stand_in / c).iterdir()) for c in ("benign", "malignant", "normal")}
    for r in plan.rows:
        (tmp_path / "sink" / "samples" / r["label"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(pngs[r["label"]].pop(), tmp_path / "sink" / "samples" / r["label"] / f"{r['id']}.png")
    (tmp_path / "sink" / "plan.json").write_text(json.dumps({"provenance": plan.provenance()}))
    return plan, tmp_path / "sink" / "samples"


def test_images_refined_from_held_out_sources_are_excluded_from_the_corpus(tmp_path):
    real = real_phantom(tmp_path / "busi", 14)
    plan, samples = _sink_from_plan(tmp_path, f"generate.source={real}", "generate.source_split=all",
                                    "generate.count=14")
    recs = {r.id: r for r in real_records(real)}
    leaked = sorted(r["id"] for r in plan.rows if recs[r["id"].removeprefix("syn-")].split in ("val", "test"))
    assert leaked
    res = run_evaluate(_cfg(tmp_path, real, samples))
    out = res.metrics["leakage"]["synthetic_refused"]
    assert sorted(x["id"].split("/")[1] for x in out) == leaked
    assert all("refined from" in x["reason"] for x in out)
    assert res.metrics["inputs"]["synthetic"]["n"] == len(plan.rows) - len(leaked)
    with pytest.raises(LeakageError, match=f"{leaked[0]}.*refined from"):
        run_evaluate(_cfg(tmp_path, real, samples, "evaluate.leakage=error"))


def test_the_corpus_adapter_is_guarded_without_being_named(tmp_path):
    from tests.unit.adapter_fixture import ti_adapter

    real = real_phantom(tmp_path / "busi", 14)
    test = select(real_records(real), ["test"])
    adapter = ti_adapter(tmp_path / "adapter", "<bus>", trained_ids=(test[0].id,))
    _, samples = _sink_from_plan(tmp_path, f"generate.adapters={adapter}", "model.preset=tiny")
    shutil.rmtree(adapter)  # evaluation reads what plan.json recorded, not the adapter folder
    res = run_evaluate(_cfg(tmp_path, real, samples))
    refused = {x["id"]: x for x in res.metrics["leakage"]["refused"]}
    assert "trained on by the corpus's adapter" in refused[test[0].id]["reason"]
    assert res.metrics["leakage"]["provenance"]["plan"].endswith("plan.json")


def test_images_conditioned_on_a_held_out_mask_are_excluded_from_the_corpus(tmp_path):
    """Generation conditions only on train masks; judged under another split (here: another split seed),
    the images whose mask is now a val or test patient's are refused, as refined ones are."""
    real = real_phantom(tmp_path / "busi", 14)
    plan, samples = _sink_from_plan(tmp_path, "model.preset=tiny", f"data.root={real}",
                                    "generate.controlnet.model=preset", "generate.count=14")
    recs = {r.id: r for r in real_records(real, split=load_config(None, ["data.split.seed=1"]).data.split)}
    leaked = sorted(r["id"] for r in plan.rows if r["condition_id"]
                    and recs[r["condition_id"]].split in ("val", "test"))
    assert leaked
    res = run_evaluate(_cfg(tmp_path, real, samples, "data.split.seed=1"))
    out = res.metrics["leakage"]["synthetic_refused"]
    assert sorted(x["id"].split("/")[1] for x in out) == leaked
    assert all("lesion mask is" in x["reason"] for x in out)

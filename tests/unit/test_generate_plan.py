"""The generation plan and its config: stable ids and seeds, counts, adapters, clear errors (no Ray)."""

from __future__ import annotations

import pytest

from busdiff.cli import main
from busdiff.config import ConfigError, load_config
from busdiff.generate.plan import build_plan, class_counts, make_id
from tests.conftest import REPO
from tests.unit.adapter_fixture import ti_adapter

TOKEN = "<bus>"


def test_same_config_same_ids_and_seeds():
    sets = ["generate.count=3", "generate.seed=10"]
    a, b = build_plan(load_config(None, sets)), build_plan(load_config(None, sets))
    assert a.rows == b.rows and a.recipe_hash == b.recipe_hash
    assert len(a.rows) == 9 and len(set(a.ids)) == 9
    assert a.ids[0] == make_id("syn", "benign", 0) == "syn-benign-00000"
    assert len({r["seed"] for r in a.rows}) == 9 and len({r["refine_seed"] for r in a.rows}) == 9
    first = a.rows[0]
    assert (first["seed"], first["refine_seed"]) == (10, 4000)  # the paper's img2img seeds: 4000 + i
    assert first["prompt"] == "an ultrasound image showing a benign breast lesion with smooth borders"


def test_growing_one_class_keeps_every_other_id_and_seed():
    small = build_plan(load_config(None, ["generate.count={benign: 2, malignant: 2}"]))
    grown = build_plan(load_config(None, ["generate.count={benign: 5, malignant: 2}"]))
    assert small.counts == {"benign": 2, "malignant": 2}
    old = {r["id"]: r for r in small.rows}
    assert all(old[r["id"]] == r for r in grown.rows if r["id"] in old)
    assert set(old) < set(grown.ids)
    # counts are not part of the recipe: the grown plan resumes into the same sink
    assert small.recipe_hash == grown.recipe_hash
    assert build_plan(load_config(None, ["generate.steps=20"])).recipe_hash != small.recipe_hash


def test_total_is_split_by_ratios_with_largest_remainders():
    cfg = load_config(None, ["generate.total=10", "generate.ratios={benign: 2, malignant: 1, normal: 1}"])
    assert class_counts(cfg.generate) == {"benign": 5, "malignant": 3, "normal": 2}
    assert class_counts(load_config(None, ["generate.total=7"]).generate) == {
        "benign": 3,
        "malignant": 2,
        "normal": 2,
    }
    with pytest.raises(ConfigError, match="generate.total=2.*0 images of normal"):
        build_plan(load_config(None, ["generate.total=2", "generate.ratios={benign: 5, normal: 1}"]))


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("generate.count={benign: 3, cyst: 2}", ["generate.count", "'cyst'", "benign, malignant, normal"]),
        ("generate.prompts={tumour: 'a {token}'}", ["generate.prompts", "'tumour'"]),
        ("generate.strength=0", ["generate.strength", "greater than 0"]),
        ("generate.strength=1.5", ["generate.strength", "less than or equal to 1"]),
        ("generate.steps=0", ["generate.steps", "greater than or equal to 1"]),
        ("generate.refine_steps=0", ["generate.refine_steps"]),
        ("generate.size=60", ["generate.size", "multiple of 8", "got 60"]),
        ("generate.count=0", ["generate.count", "must be >= 1", "got 0"]),
        ("generate.count={benign: -1}", ["generate.count", "count of benign is -1"]),
        ("generate.scheduler=Fancy", ["generate.scheduler", "DDIM", "EulerAncestral"]),
        ("generate.text2img.actors=[3, 1]", ["generate.text2img.actors", "min <= max"]),
        ("generate.handoff=pixels", ["generate.handoff", "image, latent"]),
    ],
)
def test_bad_input_names_the_field(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for name in names:
        assert name in str(e.value)


def test_count_and_total_are_exclusive_and_img2img_must_run():
    with pytest.raises(ConfigError, match="generate.count .*generate.total"):
        load_config(None, ["generate.count=3", "generate.total=9"])
    with pytest.raises(ConfigError, match=r"int\(generate.refine_steps \* generate.strength\)"):
        load_config(None, ["generate.refine_steps=3", "generate.strength=0.3"])
    with pytest.raises(ConfigError, match="generate.source .*generate.refine=true"):
        load_config(None, ["generate.source=/data", "generate.refine=false"])


def test_adapter_token_goes_into_every_prompt(tmp_path):
    adir = ti_adapter(tmp_path / "adapter", TOKEN)
    plan = build_plan(load_config(None, ["generate.count=1", f"generate.adapters={adir}"]))
    assert set(plan.tokens.values()) == {TOKEN} and len(plan.adapter_hash) == 16
    assert plan.provenance()["adapter"]["trained_ids"] == ["benign_0001"]
    assert all(TOKEN in r["prompt"] for r in plan.rows)
    assert plan.recipe["adapter_hash"] == plan.adapter_hash
    # a template without {token} would load the TI embedding and never use it (the paper's code did)
    with pytest.raises(ConfigError, match="generate.prompts.*normal.*never used"):
        build_plan(load_config(None, [f"generate.adapters={adir}", "generate.prompts={normal: 'a scan'}"]))


def test_adapters_for_another_base_model_are_refused_naming_both(tmp_path):
    adir = ti_adapter(tmp_path / "adapter", TOKEN, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(ConfigError) as e:
        build_plan(load_config(None, [f"generate.adapters={adir}", "model.preset=tiny"]))
    msg = str(e.value)
    assert "generate.adapters" in msg and "'stable-diffusion-v1-5/stable-diffusion-v1-5'" in msg
    assert "'tiny'" in msg
    with pytest.raises(ConfigError, match="generate.adapters.*does not exist"):
        build_plan(load_config(None, [f"generate.adapters={tmp_path / 'nowhere'}"]))


def test_real_images_from_a_folder_become_refine_rows(tmp_path):
    from busdiff.data.phantom import write_phantom

    write_phantom(tmp_path / "busi", 3, seed=1, size=64)
    cfg = load_config(None, [f"generate.source={tmp_path / 'busi'}", "generate.count={malignant: 2}",
                             "generate.source_split=all"])
    plan = build_plan(cfg)
    assert plan.mode == "refine" and plan.counts == {"malignant": 2}
    assert plan.ids == ["syn-malignant_0001", "syn-malignant_0002"]
    assert all(r["source"].endswith(".png") and r["seed"] == -1 for r in plan.rows)
    # plan.json's provenance names each sample's real source by id and content, for evaluation's guard
    assert plan.provenance()["sources"]["syn-malignant_0001"]["record"] == "malignant_0001"
    assert len(plan.provenance()["sources"]["syn-malignant_0001"]["sha256"]) == 64
    train = build_plan(load_config(None, [f"generate.source={tmp_path / 'busi'}"]))
    assert 0 < len(train.rows) < 9


def test_shipped_generate_configs_are_valid():
    paths = sorted((REPO / "jobs" / "configs").glob("generate-*.yaml"))
    assert len(paths) >= 2
    for p in paths:
        load_config(p)


def test_cli_bad_config_exits_2_naming_the_field_before_ray(tmp_path, capsys, forbid_ray_start):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  count: {benign: 2, cyst: 1}\n")
    assert main(["generate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "generate.count" in err and "cyst" in err
    adir = ti_adapter(tmp_path / "adapter", TOKEN, base_model="sd15-shape")
    assert main(["generate", "--set", f"generate.adapters={adir}"]) == 2
    assert "'sd15-shape'" in capsys.readouterr().err


def test_resource_shortfalls_are_named_before_the_run_waits_on_them():
    from busdiff.generate.pipeline import resource_warnings

    ok = load_config(None, ["generate.count=1"]).generate
    assert resource_warnings(ok, "text2img", {"CPU": 4}) == []
    gpu = load_config(None, ["generate.text2img.num_gpus=1", "generate.img2img.num_gpus=0.5"]).generate
    warned = resource_warnings(gpu, "text2img", {"CPU": 4})
    assert [w.split(" but")[0] for w in warned] == [
        "generate.text2img.num_gpus=1",
        "generate.img2img.num_gpus=0.5",
    ]
    assert resource_warnings(gpu, "text2img", {"CPU": 4, "GPU": 1}) == []
    full = load_config(None, ["generate.text2img.actors=2", "generate.img2img.actors=[2, 4]"]).generate
    assert "take 4 of the cluster's 4 CPUs" in resource_warnings(full, "text2img", {"CPU": 4})[0]
    assert resource_warnings(full, "refine", {"CPU": 4}) == []  # real images: no text2img pool


def test_generate_subcommand_has_help():
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run(
        [str(Path(sys.executable).parent / "busdiff"), "generate", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "usage: busdiff generate" in r.stdout and "--set" in r.stdout


def test_each_class_prompt_gets_its_own_adapter_token(tmp_path):
    tokens = {"benign": "<bus-benign>", "malignant": "<bus-malignant>", "normal": "<bus-normal>"}
    adir = ti_adapter(tmp_path / "adapter", tokens)
    plan = build_plan(load_config(None, ["generate.count=2", f"generate.adapters={adir}"]))
    for r in plan.rows:
        others = [t for c, t in tokens.items() if c != r["label"]]
        assert tokens[r["label"]] in r["prompt"] and not any(t in r["prompt"] for t in others), r
    assert plan.tokens == tokens
    assert plan.recipe["prompts"]["malignant"].startswith("an <bus-malignant> image")
    # generate.token overrides every class's token
    forced = build_plan(load_config(None, ["generate.count=1", f"generate.adapters={adir}",
                                           "generate.token=<bus-benign>"]))
    assert all("<bus-benign>" in r["prompt"] for r in forced.rows)


def test_an_adapter_with_several_tokens_and_no_class_map_is_refused(tmp_path):
    import json

    adir = ti_adapter(tmp_path / "adapter", {"benign": "<a>", "malignant": "<b>", "normal": "<c>"})
    meta = json.loads((adir / "adapter.json").read_text())
    meta.pop("class_tokens")
    meta["extra"].pop("class_tokens", None)
    (adir / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="generate.adapters.*3 tokens.*class"):
        build_plan(load_config(None, ["generate.count=1", f"generate.adapters={adir}"]))


def test_refining_real_images_defaults_to_the_train_split(tmp_path):
    from busdiff.data.phantom import write_phantom

    write_phantom(tmp_path / "busi", 20, seed=1, size=64)
    plan = build_plan(load_config(None, [f"generate.source={tmp_path / 'busi'}", "generate.count=100"]))
    assert plan.recipe["source_split"] == "train"
    everything = build_plan(load_config(None, [f"generate.source={tmp_path / 'busi'}", "generate.count=100",
                                               "generate.source_split=all"]))
    assert len(plan.rows) < len(everything.rows) == 60

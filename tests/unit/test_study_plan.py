"""The study's plan (no Ray): shared stage runs, recipe keys, errors naming the configuration."""

from __future__ import annotations

import pytest

from busdiff.config import ConfigError, load_config
from busdiff.study.plan import build_study_plan
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "study-tiny.yaml"


@pytest.fixture(scope="module")
def plan_of(tmp_path_factory):
    """``plan_of(*sets, config=...)``: the study plan on phantom data with masks (a ControlNet
    configuration's plan picks each image's train mask)."""
    from busdiff.data.phantom import write_phantom

    root = tmp_path_factory.mktemp("phantom")
    write_phantom(root, 6, seed=0, size=64)

    def plan(*sets: str, config=TINY):
        return build_study_plan(load_config(config, [f"data.root={root}", *sets]))

    return plan


def test_the_default_configurations_share_fine_tuning_and_generation(plan_of):
    plan = plan_of()
    kinds = [r.kind for r in plan.runs.values()]
    # lora and lora_ti read one fine-tuning run; lora_ti and lora_ti_refined one generation sink, and
    # the two ControlNet configurations another
    assert kinds.count("finetune") == 1 and kinds.count("generate") == 4 and kinds.count("evaluate") == 6
    assert kinds[-1] == "classifier"
    arms = {a.name: a for a in plan.arms}
    assert arms["real"].generate is None and not arms["real"].synthetic
    assert arms["base"].adapter is None and arms["base"].finetune is None
    assert arms["lora"].finetune == arms["lora_ti"].finetune
    assert arms["lora"].adapter.endswith("/adapters-lora") and arms["lora_ti"].adapter.endswith("/adapters")
    assert arms["lora_ti"].generate == arms["lora_ti_refined"].generate
    assert arms["lora_ti"].images.endswith("/text2img")
    assert arms["lora_ti_refined"].images.endswith("/samples")
    assert len({a.evaluate for a in plan.arms if a.synthetic}) == 6
    assert arms["lora_ti_controlnet"].generate == arms["lora_ti_controlnet_refined"].generate
    assert arms["lora_ti_controlnet"].generate != arms["lora_ti"].generate
    # the segmentation judge runs where there are masks: the ControlNet configurations' evaluations
    judged = {a.name: plan.runs[a.evaluate].cfg.evaluate.segmentation.enabled
              for a in plan.arms if a.synthetic}
    assert [n for n, on in judged.items() if on] == ["lora_ti_controlnet", "lora_ti_controlnet_refined"]
    # every evaluation guards against every adapter of the study: one judged set for all
    adapters = {tuple(plan.runs[a.evaluate].cfg.evaluate.adapters) for a in plan.arms if a.synthetic}
    assert len(adapters) == 1 and len(next(iter(adapters))) == 2


def test_keys_follow_recipes_not_resources_or_paths(plan_of):
    plan = plan_of()
    same = plan_of("generate.text2img.actors=2", "finetune.log_every=1")
    assert list(plan.runs) == list(same.runs)
    other = plan_of("generate.steps=5")
    changed = set(plan.runs) ^ set(other.runs)
    assert all(k.split("/")[0] in ("generate", "evaluate", "classifier") for k in changed)
    assert [k for k in plan.runs if k.startswith("finetune/")] == [
        k for k in other.runs if k.startswith("finetune/")
    ]
    # a fine-tuning change reaches everything downstream of it, not the base model's generation
    ft = plan_of("finetune.lora.rank=8")
    base = next(a for a in plan.arms if a.name == "base").generate
    assert base in ft.runs and next(a for a in ft.arms if a.name == "lora").generate not in plan.runs


def test_bad_configurations_name_the_configuration_and_field(plan_of):
    with pytest.raises(ConfigError, match=r"configurations\[1\] \(base\)\.generate: steps"):
        plan_of("study.configurations=[{name: real, synthetic: false}, {name: base, adapter: none, "
              "generate: {steps: -1}}]")
    with pytest.raises(ConfigError, match="images=text2img needs generate.keep_text2img"):
        plan_of("study.configurations=[{name: x, images: text2img}]")
    with pytest.raises(ConfigError, match="adapter=lora_phase needs finetune.method"):
        plan_of("study.configurations=[{name: x, adapter: lora_phase, finetune: {method: ti}}]")
    with pytest.raises(ConfigError, match="names must be distinct, repeated: a"):
        plan_of("study.configurations=[{name: a}, {name: a}]")


@pytest.mark.parametrize(
    "name", ["local.yaml", "study-tiny.yaml", "study-mini-busi.yaml", "study-sd15-busi.yaml"]
)
def test_shipped_study_configs_plan_the_authors_configurations(name, plan_of):
    plan = plan_of(config=REPO / "jobs" / "configs" / name)
    five = ["real", "base", "lora", "lora_ti", "lora_ti_refined"]
    controlnet = ["lora_ti_controlnet", "lora_ti_controlnet_refined"]
    # the demo and the mini study: the five (a preset ControlNet is untrained on the miniature base)
    assert [a.name for a in plan.arms] == five + (controlnet if "tiny" in name or "sd15" in name else [])
    assert plan.classifier is not None

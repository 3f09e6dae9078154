"""The study's plan (no Ray): shared stage runs, recipe keys, errors naming the configuration."""

from __future__ import annotations

import pytest

from busdiff.config import ConfigError, load_config
from busdiff.study.plan import build_study_plan
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "study-tiny.yaml"


def _plan(*sets: str):
    return build_study_plan(load_config(TINY, list(sets)))


def test_the_default_configurations_share_fine_tuning_and_generation():
    plan = _plan()
    kinds = [r.kind for r in plan.runs.values()]
    # lora and lora_ti read one fine-tuning run; lora_ti and lora_ti_refined one generation sink
    assert kinds.count("finetune") == 1 and kinds.count("generate") == 3 and kinds.count("evaluate") == 4
    assert kinds[-1] == "classifier"
    arms = {a.name: a for a in plan.arms}
    assert arms["real"].generate is None and not arms["real"].synthetic
    assert arms["base"].adapter is None and arms["base"].finetune is None
    assert arms["lora"].finetune == arms["lora_ti"].finetune
    assert arms["lora"].adapter.endswith("/adapters-lora") and arms["lora_ti"].adapter.endswith("/adapters")
    assert arms["lora_ti"].generate == arms["lora_ti_refined"].generate
    assert arms["lora_ti"].images.endswith("/text2img")
    assert arms["lora_ti_refined"].images.endswith("/samples")
    assert len({a.evaluate for a in plan.arms if a.synthetic}) == 4
    # every evaluation guards against every adapter of the study: one judged set for all
    adapters = {tuple(plan.runs[a.evaluate].cfg.evaluate.adapters) for a in plan.arms if a.synthetic}
    assert len(adapters) == 1 and len(next(iter(adapters))) == 2


def test_keys_follow_recipes_not_resources_or_paths():
    plan = _plan()
    same = _plan("generate.text2img.actors=2", "finetune.log_every=1")
    assert list(plan.runs) == list(same.runs)
    other = _plan("generate.steps=5")
    changed = set(plan.runs) ^ set(other.runs)
    assert all(k.split("/")[0] in ("generate", "evaluate", "classifier") for k in changed)
    assert [k for k in plan.runs if k.startswith("finetune/")] == [
        k for k in other.runs if k.startswith("finetune/")
    ]
    # a fine-tuning change reaches everything downstream of it, not the base model's generation
    ft = _plan("finetune.lora.rank=8")
    base = next(a for a in plan.arms if a.name == "base").generate
    assert base in ft.runs and next(a for a in ft.arms if a.name == "lora").generate not in plan.runs


def test_bad_configurations_name_the_configuration_and_field():
    with pytest.raises(ConfigError, match=r"configurations\[1\] \(base\)\.generate: steps"):
        _plan("study.configurations=[{name: real, synthetic: false}, {name: base, adapter: none, "
              "generate: {steps: -1}}]")
    with pytest.raises(ConfigError, match="images=text2img needs generate.keep_text2img"):
        _plan("study.configurations=[{name: x, images: text2img}]")
    with pytest.raises(ConfigError, match="adapter=lora_phase needs finetune.method"):
        _plan("study.configurations=[{name: x, adapter: lora_phase, finetune: {method: ti}}]")
    with pytest.raises(ConfigError, match="names must be distinct, repeated: a"):
        _plan("study.configurations=[{name: a}, {name: a}]")


@pytest.mark.parametrize(
    "name", ["local.yaml", "study-tiny.yaml", "study-mini-busi.yaml", "study-sd15-busi.yaml"]
)
def test_shipped_study_configs_plan_the_five_configurations(name):
    plan = build_study_plan(load_config(REPO / "jobs" / "configs" / name))
    assert [a.name for a in plan.arms] == ["real", "base", "lora", "lora_ti", "lora_ti_refined"]
    assert plan.classifier is not None

from __future__ import annotations

import pytest

from busdiff.config import ConfigError, dump_config, load_config, parse_overrides

REPO_CONFIGS = ["jobs/configs/local.yaml"]


def test_defaults_load_and_round_trip(tmp_path):
    cfg = load_config()
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_shipped_configs_are_valid(path):
    from tests.conftest import REPO

    load_config(REPO / path)


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["generate.steps=8", "model.preset=tiny", "ray.address=null", "x.y.z=0.5"]) == {
        "generate": {"steps": 8},
        "model": {"preset": "tiny"},
        "ray": {"address": None},
        "x": {"y": {"z": 0.5}},
    }


def test_override_beats_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generate:\n  steps: 3\n  size: 32\n")
    cfg = load_config(p, ["generate.steps=9"])
    assert (cfg.generate.steps, cfg.generate.size) == (9, 32)


def test_unknown_choice_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.preset=huge"])
    msg = str(e.value)
    assert "model.preset: must be one of tiny, sd15-shape, pretrained, miniature (got 'huge')" in msg


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match=r"generate\.stepz"):
        load_config(None, ["generate.stepz=3"])


def test_size_must_be_multiple_of_8():
    with pytest.raises(ConfigError, match=r"generate\.size.*multiple of 8"):
        load_config(None, ["generate.size=30"])


def test_img2img_must_run_at_least_one_step():
    with pytest.raises(ConfigError, match=r"int\(2 \* 0.3\) = 0"):
        load_config(None, ["generate.refine_steps=2", "generate.strength=0.3"])


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(None, ["data.split.train=0.9"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["generate.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_an_override_that_is_not_yaml_is_one_message_naming_it():
    with pytest.raises(ConfigError, match=r"override 'generate.count=\{benign: 3': the value is not valid"):
        load_config(None, ["generate.count={benign: 3"])

"""Fine-tuning config and input checks: the paper's recipe by default, and bad input refused with the
field named before any Ray worker (or Ray itself) starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from busdiff.cli import main
from busdiff.config import ConfigError, load_config
from busdiff.data.phantom import write_phantom
from busdiff.finetune.recipe import captions, class_tokens, phases, placeholder_tokens
from busdiff.finetune.trainer import prepare, run_finetune
from busdiff.models.presets import ModelLoadError
from tests.conftest import REPO


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft") / "busi"
    write_phantom(root, 4, seed=3, size=64)  # 3 train images per class after the 70/15/15 split
    return root


def _cfg(phantom: Path, tmp_path: Path, *sets: str):
    base = [
        f"data.root={phantom}",
        "model.preset=tiny",
        f"finetune.out={tmp_path}/run",
        "finetune.resolution=32",
        "finetune.lora.batch_size=2",
        "finetune.ti.batch_size=1",
        "finetune.lora.steps=2",
        "finetune.ti.steps=2",
        "finetune.mixed_precision=no",
    ]
    return load_config(None, [*base, *sets])


def test_defaults_are_the_papers_recipe():
    for cfg in (load_config(), load_config(REPO / "jobs/configs/sd15-busi.yaml")):
        ft = cfg.finetune
        assert ft.method == "lora-then-ti" and ft.splits == ["train"] and ft.resolution == 512
        assert (ft.lora.rank, ft.lora.steps, ft.lora.lr, ft.lora.batch_size) == (4, 3000, 1e-4, 4)
        assert (ft.ti.num_vectors, ft.ti.initializer_token, ft.ti.steps, ft.ti.lr) == (
            1,
            "ultrasound",
            2000,
            5e-4,
        )
        assert (ft.ti.batch_size, ft.ti.grad_accum, ft.lr_scheduler) == (1, 4, "constant")
        assert [p.name for p in phases(ft)] == ["lora", "ti"]
    assert load_config(REPO / "jobs/configs/sd15-busi.yaml").finetune.mixed_precision == "fp16"
    load_config(REPO / "jobs/configs/finetune-tiny.yaml")


def test_methods_make_their_phases():
    def plan(method):
        return [
            (p.name, p.lora, p.ti, p.steps)
            for p in phases(load_config(None, [f"finetune.method={method}"]).finetune)
        ]

    assert plan("lora") == [("lora", True, False, 3000)]
    assert plan("ti") == [("ti", False, True, 2000)]
    assert plan("lora+ti") == [("lora+ti", True, True, 3000)]  # pivotal: one schedule, both parts
    assert plan("lora-then-ti") == [("lora", True, False, 3000), ("ti", False, True, 2000)]


def test_captions_put_the_token_in_every_class_prompt():
    ft = load_config(None, ["finetune.method=ti", "finetune.ti.per_class=true"]).finetune
    assert placeholder_tokens(ft) == ["<bus-benign>", "<bus-malignant>", "<bus-normal>"]
    caps = captions(ft)
    assert all(class_tokens(ft)[c] in caps[c] for c in caps)
    lora_only = load_config(None, ["finetune.method=lora"]).finetune
    assert placeholder_tokens(lora_only) == [] and captions(lora_only)["malignant"].startswith(
        "an ultrasound image"
    )


@pytest.mark.parametrize(
    ("sets", "field"),
    [
        (["finetune.method=dreambooth"], "finetune.method"),
        (["finetune.lora.rank=0"], "finetune.lora.rank"),
        (["finetune.lora.rank=-2"], "finetune.lora.rank"),
        (["finetune.resolution=60"], "finetune.resolution"),
        (["finetune.ti.token=<Bus>"], "finetune.ti.token"),
        (["finetune.captions={benign: 'a {token}', malignant: 'b {token}'}"], "finetune.captions"),
        (["finetune.captions={benign: x, malignant: '{token} y', normal: '{token} z'}"], "finetune.captions"),
    ],
)
def test_bad_config_names_the_field(sets, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert field in str(e.value)


def test_lora_only_captions_need_no_token():
    cfg = load_config(
        None, ["finetune.method=lora", "finetune.captions={benign: a, malignant: b, normal: c}"]
    )
    assert captions(cfg.finetune) == {"benign": "a", "malignant": "b", "normal": "c"}


@pytest.mark.parametrize(
    ("sets", "exc", "needle"),
    [
        (["finetune.ti.token=ultrasound"], ConfigError, "finetune.ti.token"),  # already in the vocabulary
        (["finetune.ti.initializer_token=breastlesion"], ConfigError, "finetune.ti.initializer_token"),
        (["finetune.splits=[holdout]"], ConfigError, "finetune.splits"),
        (
            ["finetune.lora.batch_size=4", "finetune.scaling.num_workers=3"],
            ConfigError,
            "finetune.lora.batch_size",
        ),
        (["model.preset=pretrained", "model.base=/nonexistent/sd15"], ModelLoadError, "model.base"),
        (["model.device=cuda"], ConfigError, "finetune.scaling.use_gpu"),
    ],
)
def test_bad_input_is_refused_before_ray_starts(phantom, tmp_path, sets, exc, needle, forbid_ray_start):
    cfg = _cfg(phantom, tmp_path, *sets)
    with pytest.raises(exc) as e:
        run_finetune(cfg)
    assert needle in str(e.value)
    assert not (tmp_path / "run").exists()


def test_missing_data_dir_names_data_root(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path}/nowhere", "model.preset=tiny"])
    with pytest.raises(ConfigError) as e:
        prepare(cfg)
    assert "data.root" in str(e.value) and f"{tmp_path}/nowhere" in str(e.value)


def test_prepare_trains_on_the_train_split_only(phantom, tmp_path):
    prep = prepare(_cfg(phantom, tmp_path))
    assert len(prep.records) == 9 and {r.split for r in prep.records} == {"train"}
    both = prepare(_cfg(phantom, tmp_path, "finetune.splits=[train, val]"))
    assert {r.split for r in both.records} == {"train", "val"} and len(both.records) > 9


def test_a_run_dir_resumes_only_under_the_same_training_config(phantom, tmp_path):
    cfg = _cfg(phantom, tmp_path)
    prep = prepare(cfg)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"fingerprint": prep.fingerprint}))
    # Scheduling fields may change between a run and its resumption...
    assert prepare(
        _cfg(phantom, tmp_path, "finetune.max_failures=0", "finetune.scaling.cpus_per_worker=2")
    ).resumable
    # ...fields that change the weights may not: the worker count decides the shards and the batch.
    with pytest.raises(ConfigError) as e:
        prepare(_cfg(phantom, tmp_path, "finetune.lora.rank=8", "finetune.seed=1"))
    assert "finetune.lora.rank" in str(e.value) and "finetune.seed" in str(e.value)
    with pytest.raises(ConfigError, match=r"changed: finetune\.scaling\.num_workers\)"):
        prepare(_cfg(phantom, tmp_path, "finetune.scaling.num_workers=2"))


def test_cli_reports_bad_input_with_exit_code_2(phantom, capsys):
    rc = main(
        [
            "finetune",
            str(REPO / "jobs/configs/finetune-tiny.yaml"),
            "--set",
            f"data.root={phantom}",
            "--set",
            "finetune.lora.rank=0",
        ]
    )
    assert rc == 2 and "finetune.lora.rank" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--help"])
    assert e.value.code == 0 and "usage: busdiff finetune" in capsys.readouterr().out

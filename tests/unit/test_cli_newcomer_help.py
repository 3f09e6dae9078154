"""Issue 10, items 8 and 11, through the real ``busdiff`` command (a subprocess, real files in tmp_path):
``data check`` shows the split the other stages use and its leaks, and the image sizes; every subcommand's
``--help`` says what it does, what runs without a config and what each option means and defaults to; the
README's ``busdiff fid`` example and its KID figures are what the default command uses and prints."""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from busdiff.cli import build_parser
from busdiff.config import SplitConfig
from busdiff.data.busi import load_dataset
from busdiff.data.splits import assign_splits, split_counts
from busdiff.evaluate.fidelity import kid_subset_size
from tests.conftest import REPO

BUSDIFF = str(Path(sys.executable).parent / "busdiff")


def _busdiff(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([BUSDIFF, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


# ------------------------------------------------------------------------------------------ item 8


def test_data_check_on_the_kaggle_layout_shows_the_stages_split_its_leaks_and_the_sizes(tmp_path):
    root = tmp_path / "busi"
    _busdiff("data", "phantom", str(root), "--n-per-class", "6", "--size", "64")
    for n in range(2, 7):  # one benign picture six times: duplicates that the split puts apart
        shutil.copy(root / "benign" / "benign (1).png", root / "benign" / f"benign ({n}).png")
    out = tmp_path / "report.json"

    printed = _busdiff("data", "check", str(root), "--json", str(out)).stdout

    report = json.loads(out.read_text())
    stages = assign_splits(load_dataset(root).records, SplitConfig())  # what fine-tuning etc. train on
    assert report["split"]["source"] == "assigned" and report["counts"] == split_counts(stages)
    split_of = {r.id: r.split for r in stages}
    across = [lk for lk in report["leaks"] if "split" in lk["cross"]]
    assert across
    for lk in across:
        assert (lk["a_split"], lk["b_split"]) == (split_of[lk["a"]], split_of[lk["b"]])
    header = printed.splitlines()[0].split()
    assert header == ["class", "train", "val", "test", "total"]  # not "none"
    assert "split: none in the data; shown as fine-tuning, generation and evaluation assign it" in printed
    assert f"split ({len(across)})" in printed and "across split" in printed
    assert "image sizes: all 64x64" in printed


# ------------------------------------------------------------------------------------------ item 11


def _leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) of every runnable subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaves(child, (*prefix, name))


LEAVES = dict(_leaves(build_parser()))


def test_every_subcommand_is_listed():
    assert {" ".join(words) for words in LEAVES} >= {
        "data check", "data phantom", "config", "finetune", "generate", "evaluate", "fid", "study", "serve",
        "demo",
    }


@pytest.mark.parametrize("words", sorted(LEAVES), ids=" ".join)
def test_help_says_what_the_command_does_its_config_and_each_options_meaning_and_default(words):
    text = _busdiff(*words, "--help").stdout
    parser = LEAVES[words]
    assert parser.description and len(parser.description) > 60, f"{words}: no description of what it does"
    flat = " ".join(text.split())
    assert " ".join(parser.description.split()[:6]) in flat
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"busdiff {' '.join(words)} {name}: no help"
        default = action.default
        if default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in action.help and (str(default) in flat or "%(default)" in action.help), (
                f"busdiff {' '.join(words)} {name}: its help does not say its default {default!r}"
            )
    if "config" in {a.dest for a in parser._actions}:  # a config-driven command: what runs without one
        assert "without one" in flat
    for named in re.findall(r"jobs/configs/[\w.-]+\.yaml", text):  # every config it names is shipped
        assert (REPO / named).is_file(), f"busdiff {' '.join(words)} --help names {named}, which is missing"


@pytest.mark.parametrize("command", ["generate", "finetune", "evaluate"])
def test_stage_help_says_a_bare_command_runs_nothing_and_names_the_shipped_configs(command):
    flat = " ".join(_busdiff(command, "--help").stdout.split())
    assert "without one and without --set: the shipped configs below are listed and nothing runs" in flat
    assert "with --set alone: the built-in defaults: the paper's full" in flat
    assert f"jobs/configs/{command}-tiny.yaml" in flat


def test_demo_help_names_the_config_it_reads():
    flat = " ".join(_busdiff("demo", "--help").stdout.split())
    assert "without one: jobs/configs/local.yaml" in flat and "defaults when omitted" not in flat


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_fid_example_runs_as_written_from_the_repo_root(busi256):
    commands = re.findall(r"^busdiff fid (.*)$", _readme().replace("\\\n", " "), re.M)
    assert commands, "README has no busdiff fid example"
    for args in commands:
        dirs = [w for w in args.split() if not w.startswith("-")][:2]
        assert all((REPO / d / "manifest.csv").is_file() for d in dirs), f"busdiff fid {args}: {dirs}"
    help_text = " ".join(_busdiff("fid", "--help").stdout.split())
    example = re.search(r"busdiff fid (\S+) (\S+) --split-a", help_text)
    assert example and all((REPO / d / "manifest.csv").is_file() for d in example.groups())


def test_readme_kid_figures_name_the_subset_size_the_default_command_uses(busi256):
    with open(busi256 / "manifest.csv", newline="") as f:
        n = Counter(row["split"] for row in csv.DictReader(f))
    default = kid_subset_size(n["train"], n["test"])  # `busdiff fid ... --split-a train --split-b test`
    row = next(line for line in _readme().splitlines() if line.startswith("| `fid_check_busi256.py` |"))
    assert f"default `busdiff fid` (subset size {default}," in row
    assert f"busi-256 train vs test: {default})" in " ".join(_busdiff("fid", "--help").stdout.split())

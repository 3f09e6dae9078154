"""The one record type every dataset layout is read into."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset. ``id`` is stable across layouts: ``<class>_<NNNN>`` (e.g. benign_0433)."""

    id: str
    image_path: str
    label: str
    mask_paths: tuple[str, ...] = ()
    split: str | None = None
    width: int = 0
    height: int = 0
    sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mask_paths"] = list(self.mask_paths)
        return d


@dataclass(frozen=True)
class BadFile:
    """A file that could not be used, and why (listed by ``--skip-bad`` and the quality report)."""

    path: str
    problem: str
    #: optional machine-readable category, e.g. ``"image_without_mask"`` (see ``busdiff.data.busi``)
    kind: str = ""

    def to_dict(self) -> dict[str, str]:
        d = {"path": self.path, "problem": self.problem}
        if self.kind:
            d["kind"] = self.kind
        return d


class DatasetError(ValueError):
    """Bad input data; the message names the file and the problem."""

    def __init__(self, bad: list[BadFile] | BadFile | str, hint: str = "") -> None:
        if isinstance(bad, BadFile):
            bad = [bad]
        self.bad: list[BadFile] = [] if isinstance(bad, str) else list(bad)
        msg = bad if isinstance(bad, str) else "\n".join(f"{b.path}: {b.problem}" for b in self.bad)
        super().__init__(msg + (f"\n{hint}" if hint else ""))


@dataclass
class LoadResult:
    records: list[ImageRecord]
    bad_files: list[BadFile] = field(default_factory=list)
    layout: str = ""

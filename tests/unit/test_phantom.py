"""Synthetic BUSI-like phantoms: layout, determinism, and the ultrasound features each class must show."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from busdiff.data import phantom
from busdiff.data.phantom import CLASSES, render_phantom, write_phantom

SEEDS = range(8)


@functools.cache
def _render(label: str, seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Rendered once per (label, seed, size) for all the tests below (read-only: shared between them)."""
    img, mask = render_phantom(label, np.random.default_rng([seed, CLASSES.index(label), 1]), size)
    img.flags.writeable = mask.flags.writeable = False
    return img, mask


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _posterior_ratio(img: np.ndarray, mask: np.ndarray) -> float:
    """Mean brightness of a band just below the lesion's centre, over the same band beside the lesion
    (background pixels excluded from the latter); NaN when the lesion leaves no room below it."""
    ys, xs = np.nonzero(mask)
    n = img.shape[0]
    r0 = int(ys.max()) + 2
    r1 = min(n, r0 + 40)
    cx, w = 0.5 * (xs.min() + xs.max()), int(xs.max() - xs.min() + 1)
    if r1 - r0 < 10:
        return float("nan")
    band = img[r0:r1].astype(np.float64)
    cols = np.arange(n)
    below = band[:, np.abs(cols - cx) <= w / 4]
    side = band[:, np.abs(cols - cx) > 0.75 * w + 4]
    side = side[side > 10]
    if below.size == 0 or side.size < 200:
        return float("nan")
    return float(below.mean() / side.mean())


def _roughness(mask: np.ndarray) -> float:
    """perimeter² / (4π·area) with a pixel-edge perimeter (≈1.6 for a digital disc, more when ragged)."""
    b = mask > 0
    per = np.count_nonzero(np.diff(b, axis=0)) + np.count_nonzero(np.diff(b, axis=1))
    return per**2 / (4 * np.pi * b.sum())


def test_layout_names_modes_and_mask_values(tmp_path: Path) -> None:
    out = tmp_path / "busi"
    paths = write_phantom(out, n_per_class=2, seed=3, size=64)
    expected = [out / c / f"{c} ({i}).png" for c in CLASSES for i in (1, 2)]
    assert paths == expected
    for c in CLASSES:
        names = sorted(p.name for p in (out / c).iterdir())
        assert names == sorted([f"{c} (1).png", f"{c} (1)_mask.png", f"{c} (2).png", f"{c} (2)_mask.png"])
    assert sorted(p.name for p in out.iterdir()) == sorted(CLASSES)
    for p in paths:
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
            rgb = np.asarray(im)
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()  # gray in RGB
        with Image.open(p.with_name(p.stem + "_mask.png")) as m:
            assert (m.mode, m.size) == ("L", (64, 64))
            values = set(np.unique(np.asarray(m)).tolist())
        assert values <= {0, 255}
        assert (values == {0}) == p.parent.name.startswith("normal")


def test_render_shapes_dtypes_and_mask_values() -> None:
    for size in (64, 200):
        for label in CLASSES:
            img, mask = _render(label, 0, size)
            assert img.shape == mask.shape == (size, size)
            assert img.dtype == mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) <= {0, 255}
            assert img.std() > 10  # a picture, not a flat field


def test_write_is_deterministic_and_image_n_independent_of_count(tmp_path: Path) -> None:
    write_phantom(tmp_path / "a", 2, seed=11, size=64)
    write_phantom(tmp_path / "b", 2, seed=11, size=64)
    write_phantom(tmp_path / "c", 3, seed=11, size=64)
    write_phantom(tmp_path / "d", 2, seed=12, size=64)
    a, b, c, d = (_files(tmp_path / k) for k in "abcd")
    assert len(a) == 12 and a == b
    assert len(c) == 18 and {k: c[k] for k in a} == a
    assert all(a[k] != d[k] for k in a if not k.endswith("_mask.png") or "normal" not in k)


def test_render_depends_only_on_rng_state() -> None:
    for label in CLASSES:
        i1, m1 = _render(label, 5)
        i2, m2 = _render(label, 5)
        assert np.array_equal(i1, i2) and np.array_equal(m1, m2)
    assert not np.array_equal(_render("benign", 5)[0], _render("benign", 6)[0])


def test_normal_masks_empty_lesion_masks_present_and_darker_than_surroundings() -> None:
    for seed in SEEDS:
        assert not _render("normal", seed)[1].any()
        for label in ("benign", "malignant"):
            img, mask = _render(label, seed)
            lesion = mask > 0
            assert lesion.sum() > 100, (label, seed)
            ring = ndi.binary_dilation(lesion, iterations=10) & ~ndi.binary_dilation(lesion, iterations=3)
            ring &= img > 10  # leave out the dark background outside the field of view
            inside, around = img[lesion].mean(), img[ring].mean()
            assert inside < 0.85 * around, (label, seed, inside, around)


def test_malignant_shadows_benign_enhances() -> None:
    mal = [_posterior_ratio(*_render("malignant", s)) for s in SEEDS]
    ben = [_posterior_ratio(*_render("benign", s)) for s in SEEDS]
    assert np.count_nonzero(~np.isnan(mal)) >= 5 and np.count_nonzero(~np.isnan(ben)) >= 5
    assert np.nanmean(mal) < 0.8, mal
    assert np.nanmean(ben) > 1.0, ben
    assert np.nanmean(ben) - np.nanmean(mal) > 0.3


def test_malignant_margins_rougher_and_benign_wider_than_tall() -> None:
    rough = {c: [_roughness(_render(c, s)[1]) for s in SEEDS] for c in ("benign", "malignant")}
    assert np.mean(rough["malignant"]) > 1.4 * np.mean(rough["benign"]), rough
    for s in SEEDS:
        ys, xs = np.nonzero(_render("benign", s)[1])
        assert np.ptp(xs) > np.ptp(ys), s


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_per_class": 0}, "n_per_class"),
        ({"n_per_class": -2}, "n_per_class"),
        ({"n_per_class": 1, "size": 63}, "size"),
        ({"n_per_class": 1, "size": 0}, "size"),
        ({"n_per_class": 1, "seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_naming_them(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        write_phantom(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_render_bad_arguments() -> None:
    with pytest.raises(ValueError, match="label"):
        render_phantom("cancer", np.random.default_rng(0))
    with pytest.raises(ValueError, match="size"):
        render_phantom("benign", np.random.default_rng(0), size=32)


def test_failed_write_leaves_the_folder_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_render = phantom.render_phantom
    calls = []

    def flaky_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_render(*args, **kwargs)

    out = tmp_path / "out"
    write_phantom(out, 1, seed=1, size=64)
    before = _files(out)
    monkeypatch.setattr(phantom, "render_phantom", flaky_render)
    with pytest.raises(OSError, match="disk full"):
        write_phantom(out, 1, size=64, overwrite=True)
    assert _files(out) == before  # the earlier data, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder beside it


def test_a_folder_holding_data_is_refused_unless_overwrite(tmp_path: Path) -> None:
    write_phantom(tmp_path, 1, seed=1, size=64)
    with pytest.raises(ValueError, match="not empty"):
        write_phantom(tmp_path, 2, seed=1, size=64)
    assert len(_files(tmp_path)) == 6
    write_phantom(tmp_path, 2, seed=1, size=96, overwrite=True)
    assert len(_files(tmp_path)) == 12


def test_a_studys_phantom_data_is_written_once_replaced_when_its_recipe_changes_never_merged(tmp_path):
    from busdiff.data.phantom import PHANTOM_STAMP, write_phantom_once

    root = tmp_path / "phantom"
    assert write_phantom_once(root, 2, seed=0, size=64)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert not write_phantom_once(root, 2, seed=0, size=64)  # the same: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    assert write_phantom_once(root, 3, seed=0, size=64)  # the phantom section changed: replaced
    assert len(list((root / "benign").glob("* ([0-9]).png"))) == 3
    assert '"n_per_class": 3' in (root / PHANTOM_STAMP).read_text()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not phantom data"):
        write_phantom_once(root, 4, seed=0, size=64)
    assert (root / "notes.txt").is_file()

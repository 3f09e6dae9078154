"""Deterministic synthetic breast-ultrasound phantoms in the original Kaggle BUSI layout.

Each picture is rendered in beam coordinates (depth down, lateral across) and then scan-converted into
a rectangular, trapezoidal or sector field on a dark background:

* tissue reflectivity: wavy horizontal layers (bright skin line, subcutaneous fat with dark lobules and
  bright Cooper's ligaments, heterogeneous fibroglandular tissue, retromammary fat, striated pectoral
  muscle, dark chest wall);
* lesions (hypoechoic): ``benign`` smooth wider-than-tall ovals, sometimes with a thin bright capsule,
  posterior enhancement; ``malignant`` irregular, spiculated, often taller-than-wide, heterogeneous,
  posterior acoustic shadowing;
* speckle: the complex scatterer field (amplitude ``sqrt(reflectivity)``) is blurred by an anisotropic
  point-spread function and its magnitude taken (fully developed, Rayleigh-like, spatially correlated);
* depth attenuation with partial gain compensation, then log compression to 8 bits.

Nothing here is fitted to real images: it is a stand-in with the right file layout and the qualitative
look, for tests and smoke runs where BUSI itself cannot be shipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

__all__ = ["CLASSES", "render_phantom", "write_phantom"]

CLASSES = ("benign", "malignant", "normal")

_MIN_SIZE = 64


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sy: float, sx: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise smoothed with std (sy, sx) pixels; large scales made at low res."""
    k = max(1, int(min(sy, sx) // 2))
    hs, ws = -(-h // k) + 1, -(-w // k) + 1
    f = ndi.gaussian_filter(rng.standard_normal((hs, ws)), (sy / k, sx / k), mode="wrap")
    if k > 1:
        f = ndi.zoom(f, k, order=1)
    f = f[:h, :w]
    f = f - f.mean()
    return f / (f.std() + 1e-12)


def _smooth_curve(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """A smooth 1-D curve of length n, zero mean, unit std."""
    f = ndi.gaussian_filter1d(rng.standard_normal(n + int(6 * sigma)), sigma, mode="wrap")[:n]
    f = f - f.mean()
    return f / (f.std() + 1e-12)


def _step(d: np.ndarray, w: float) -> np.ndarray:
    """Soft 0→1 step of width w (in the units of d)."""
    return 0.5 * (1.0 + np.tanh(d / w))


def _ridges(field: np.ndarray, level: float, width: float) -> np.ndarray:
    """Thin curvy lines along the iso-contour ``field == level`` (peak 1)."""
    return np.exp(-0.5 * ((field - level) / width) ** 2)


def _tissue(rng: np.random.Generator, n: int, s: float) -> tuple[np.ndarray, float, float]:
    """Echogenicity in dB (0 ≈ bright glandular tissue) of layered breast tissue on an n×n beam grid,
    and the mean top and bottom depth (fraction of n) of the fibroglandular layer."""
    y = (np.arange(n, dtype=np.float64) / n)[:, None]

    x = np.arange(n, dtype=np.float64) / n - 0.5
    tilt = rng.uniform(-0.12, 0.12)  # the whole stack is often a little oblique

    def boundary(base: float, amp: float, sigma: float) -> np.ndarray:
        return (base + tilt * x + amp * _smooth_curve(rng, n, sigma * s))[None, :]

    skin = boundary(rng.uniform(0.008, 0.045), 0.004, 50) - tilt * x
    fat_end = boundary(rng.uniform(0.12, 0.3), rng.uniform(0.008, 0.025), 40)
    gland_end = fat_end + np.clip(boundary(rng.uniform(0.3, 0.46), 0.025, 45) - tilt * x, 0.15, None)
    retro_end = gland_end + rng.uniform(0.015, 0.05)
    muscle_end = retro_end + boundary(rng.uniform(0.08, 0.16), 0.01, 60) - tilt * x

    # subcutaneous fat: dark lobules separated by bright, curvy Cooper's ligaments
    lob = _smooth_noise(rng, n, n, 5 * s, 14 * s)
    lig = _smooth_noise(rng, n, n, 5 * s, 28 * s)
    fat = rng.uniform(-15.0, -10.0) + 3.0 * np.tanh(lob)
    fat = fat + rng.uniform(7.0, 11.0) * _ridges(lig, rng.uniform(-0.5, 0.5), 0.09) * (lob > -0.6)

    # fibroglandular: bright, streaky, with dark fat islands
    streak = _smooth_noise(rng, n, n, 1.5 * s, 10 * s)
    streak2 = _smooth_noise(rng, n, n, 4 * s, 22 * s)
    blob = _smooth_noise(rng, n, n, 5 * s, 18 * s)
    gland = rng.uniform(-5.0, -1.0) + 2.5 * streak + 2.0 * streak2
    islands = _step(blob - rng.uniform(0.2, 0.9), 0.12)
    gland = gland - rng.uniform(8.0, 13.0) * islands + 5.0 * _ridges(streak, 1.7, 0.25)

    # pectoral muscle: medium-low echo with thin horizontal fibres, bright fascia on both sides
    fib = _smooth_noise(rng, n, n, 1.0 * s, 24 * s)
    muscle = rng.uniform(-13.0, -9.0) + 1.5 * fib + 5.0 * _ridges(fib, 1.8, 0.3)

    deep = rng.uniform(-21.0, -15.0) + 3.0 * _smooth_noise(rng, n, n, 4 * s, 16 * s)
    retro = rng.uniform(-17.0, -13.0)

    w = 0.006
    t = np.full((n, n), -30.0)
    t = t + (fat - t) * _step(y - skin, w)
    t = t + (gland - t) * _step(y - fat_end, 2.5 * w)
    t = t + (retro - t) * _step(y - gland_end, w)
    t = t + (muscle - t) * _step(y - retro_end, w)
    t = t + (deep - t) * _step(y - muscle_end, w)

    def line(at: np.ndarray, width: float) -> np.ndarray:
        return np.exp(-0.5 * ((y - at) / width) ** 2)

    skin_w = rng.uniform(0.004, 0.008)
    t = np.maximum(t, rng.uniform(3.0, 6.0) - 30 * (1 - line(skin + 1.5 * skin_w, skin_w)))
    t = np.maximum(t, rng.uniform(-4.0, 0.0) - 30 * (1 - line(retro_end, 0.004)))
    t = np.maximum(t, rng.uniform(-6.0, -2.0) - 30 * (1 - line(muscle_end, 0.004)))
    return t, float(fat_end.mean()), float(gland_end.mean())


def _lesion(
    rng: np.random.Generator, label: str, n: int, top: float, bottom: float, aspect: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lesion of the given class on the n×n beam grid, centred in depth between ``top`` and ``bottom``
    (fractions of n); ``aspect`` is the grid's lateral extent over its depth once scan-converted, so the
    shape is right in the final picture. Returns (mask bool, normalised radius rho, angle from centre)."""
    malignant = label == "malignant"
    if malignant:
        a = rng.uniform(0.07, 0.17)  # lateral semi-axis
        b = a * (rng.uniform(1.0, 1.6) if rng.random() < 0.65 else rng.uniform(0.7, 1.0))
        rot = rng.uniform(-0.6, 0.6)
    else:
        a = rng.uniform(0.08, 0.2)
        b = a * rng.uniform(0.4, 0.75)
        rot = rng.uniform(-0.25, 0.25)

    # radius function r(theta) = ellipse * modulation
    th = np.linspace(0.0, 2 * np.pi, 720, endpoint=False)
    ks = np.arange(2, 17 if malignant else 5)
    if malignant:
        amp = rng.uniform(0.02, 0.12, ks.size) / ks**0.6
    else:
        amp = rng.uniform(0.0, 0.05, ks.size) * (rng.random() < 0.6)
    phase = rng.uniform(0.0, 2 * np.pi, ks.size)
    mod = 1.0 + (amp[:, None] * np.cos(ks[:, None] * th[None, :] + phase[:, None])).sum(0)
    if malignant:
        for ang in rng.uniform(0.0, 2 * np.pi, rng.integers(4, 11)):
            d = np.angle(np.exp(1j * (th - ang)))
            mod = mod + rng.uniform(0.15, 0.5) * np.exp(-0.5 * (d / rng.uniform(0.04, 0.1)) ** 2)
    r_th = a * b / np.sqrt((b * np.cos(th)) ** 2 + (a * np.sin(th)) ** 2) * mod
    reach = float(r_th.max())
    reach_x = reach / aspect

    cx = rng.uniform(0.2, 0.8)
    cy = rng.uniform(top, bottom)
    cx = float(np.clip(cx, reach_x + 0.03, 1 - reach_x - 0.03)) if reach_x < 0.47 else 0.5
    cy = float(np.clip(cy, reach + 0.12, 0.92 - reach)) if reach < 0.4 else 0.5

    c = (np.arange(n, dtype=np.float64) + 0.5) / n
    dy, dx = c[:, None] - cy, (c[None, :] - cx) * aspect
    xr = dx * np.cos(rot) + dy * np.sin(rot)
    yr = -dx * np.sin(rot) + dy * np.cos(rot)
    phi = np.arctan2(yr, xr) % (2 * np.pi)
    r_at = np.interp(phi, th, r_th, period=2 * np.pi)
    rho = np.hypot(xr, yr) / r_at
    ang = np.arctan2(dy, dx)
    return rho <= 1.0, rho, ang


def _field(
    rng: np.random.Generator, n: int
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray] | None, float]:
    """Scan-conversion map: for each output pixel its beam (depth, lateral) coordinate in pixels and a
    field mask (None for the identity: tissue fills the whole picture), and the beam grid's lateral
    extent over its depth extent in the picture."""
    kind = rng.choice(["full", "rect", "trapezoid", "sector"], p=[0.4, 0.35, 0.1, 0.15])
    c = np.arange(n, dtype=np.float64)
    yy, xx = np.meshgrid(c / n, c / n, indexing="ij")
    if kind == "full":
        return None, 1.0
    top = rng.uniform(0.0, 0.08)
    bottom = rng.uniform(0.93, 1.0)
    if kind == "rect":
        left, right = rng.uniform(0.0, 0.1), 1 - rng.uniform(0.0, 0.1)
        u = (yy - top) / (bottom - top)
        v = (xx - left) / (right - left)
        aspect = (right - left) / (bottom - top)
    elif kind == "trapezoid":
        half0 = rng.uniform(0.3, 0.42)
        half1 = min(0.5, half0 + rng.uniform(0.06, 0.16))
        u = (yy - top) / (bottom - top)
        half = half0 + (half1 - half0) * u
        v = (xx - 0.5) / (2 * half) + 0.5
        aspect = (half0 + half1) / (bottom - top)
    else:
        apex_d = rng.uniform(0.3, 0.8)  # apex above the picture
        r1 = bottom + apex_d
        r0 = top + apex_d
        half_angle = min(rng.uniform(0.35, 0.6), float(np.arcsin(0.49 / r1)))  # whole fan in the picture
        r = np.hypot(xx - 0.5, yy + apex_d)
        a = np.arctan2(xx - 0.5, yy + apex_d)
        u = (r - r0) / (r1 - r0)
        v = a / (2 * half_angle) + 0.5
        aspect = half_angle * (r0 + r1) / (r1 - r0)
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    return (u * n - 0.5, v * n - 0.5, inside), aspect


def render_phantom(label: str, rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Render one phantom of class ``label`` (one of :data:`CLASSES`).

    Returns ``(image, mask)``: ``image`` uint8 ``size×size`` grayscale B-mode, ``mask`` uint8 ``size×size``
    with values 0/255 marking exactly the lesion (all zero for ``normal``).
    """
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    if size < _MIN_SIZE:
        raise ValueError(f"size must be >= {_MIN_SIZE}, got {size}")
    n = int(size)
    s = n / 256.0
    y = (np.arange(n, dtype=np.float64) / n)[:, None]

    geo, aspect = _field(rng, n)
    echo, gland_top, gland_bottom = _tissue(rng, n, s)
    post = np.zeros((n, n))  # posterior gain change, dB
    mask = np.zeros((n, n), dtype=bool)
    if label != "normal":
        mid = 0.5 * (gland_top + gland_bottom)
        mask, rho, ang = _lesion(rng, label, n, mid - 0.08, mid + 0.06, aspect)
        malignant = label == "malignant"
        soft = _step(1.0 - rho, 0.03 if malignant else 0.02)
        if malignant:
            inner = rng.uniform(-23.0, -17.0) + 5.0 * _smooth_noise(rng, n, n, 2 * s, 3 * s)
            halo = np.exp(-0.5 * ((rho - 1.15) / 0.12) ** 2) * (rho > 1.0)
            echo = echo + rng.uniform(0.0, 4.0) * halo
        elif rng.random() < 0.3:  # cyst-like, nearly anechoic
            inner = np.full((n, n), rng.uniform(-38.0, -32.0))
        else:
            inner = rng.uniform(-25.0, -18.0) + 1.5 * _smooth_noise(rng, n, n, 3 * s, 4 * s)
        echo = echo + (inner - echo) * soft
        if not malignant and rng.random() < 0.7:  # thin bright capsule, strongest at top and bottom
            cap = np.exp(-0.5 * ((rho - 1.03) / rng.uniform(0.015, 0.03)) ** 2)
            echo = np.maximum(echo, rng.uniform(-4.0, 2.0) - 30.0 * (1.0 - cap * np.abs(np.sin(ang)) ** 0.5))
        # posterior effect: per column, the fraction of the lesion's thickness already crossed
        path = np.cumsum(soft, axis=0)
        path = ndi.gaussian_filter1d(path / max(float(path[-1].max()), 1.0), 1.5 * s, axis=1)
        post = (-rng.uniform(6.0, 13.0) if malignant else rng.uniform(2.0, 6.0)) * path
        if malignant and rng.random() < 0.4:  # a few microcalcifications
            k = int(rng.integers(2, 7))
            idx = np.flatnonzero(rho.ravel() < 0.7)
            if idx.size:
                dots = np.zeros(n * n)
                dots[rng.choice(idx, size=min(k, idx.size), replace=False)] = 1.0
                dots = ndi.gaussian_filter(dots.reshape(n, n), 0.7 * s)
                echo = np.maximum(echo, 8.0 - 40.0 * (1.0 - dots / dots.max()))

    # net depth attenuation left after time-gain compensation, with a wobbly TGC curve (all in dB)
    gain_db = -rng.uniform(6.0, 13.0) * y + 1.0 * _smooth_curve(rng, n, 25 * s)[:, None] + post
    refl = 10.0 ** ((echo + gain_db) / 10.0)

    # speckle: blur complex scatterers with an anisotropic PSF, take the magnitude; compound 3 looks
    psf = (0.6 * s, 2.4 * s)
    amp = np.sqrt(refl)
    power = np.zeros((n, n))
    for _ in range(3):
        re = ndi.gaussian_filter(amp * rng.standard_normal((n, n)), psf, mode="reflect")
        im = ndi.gaussian_filter(amp * rng.standard_normal((n, n)), psf, mode="reflect")
        power += re * re + im * im
    norm = 3.0 / (2.0 * np.pi * psf[0] * psf[1])  # E[power] per unit reflectivity
    db = 10.0 * np.log10(np.maximum(power / norm, 1e-12))
    db = ndi.gaussian_filter(db, (0.5 * s, 1.0 * s))

    # log compression to [0, 1]
    dyn = rng.uniform(34.0, 42.0)
    top = rng.uniform(2.0, 6.0)
    img = np.clip((db - top + dyn) / dyn, 0.0, 1.0)

    if geo is not None:
        u, v, inside = geo
        img = ndi.map_coordinates(img, [u, v], order=1, mode="nearest")
        mask = ndi.map_coordinates(mask.astype(np.uint8), [u, v], order=0, mode="nearest").astype(bool)
        bg = np.clip(0.012 + 0.006 * rng.standard_normal((n, n)), 0.0, 1.0)
        img = np.where(inside, img, bg)
        mask &= inside
    return (np.round(img * 255.0)).astype(np.uint8), mask.astype(np.uint8) * 255


PHANTOM_STAMP = ".busdiff-phantom.json"

#: The files write_phantom writes: ``<class>/<class> (N).png`` and ``<class>/<class> (N)_mask.png``.
_PHANTOM_FILE = re.compile(r"^(?P<cls>[a-z]+) \(\d+\)(?:_mask)?\.png$")


def _not_phantom(root: Path) -> list[Path]:
    """Files under ``root`` that write_phantom (or write_phantom_once's stamp) did not write."""
    def ours(p: Path) -> bool:
        m = _PHANTOM_FILE.match(p.name)
        in_class = p.parent.parent == root and p.parent.name in CLASSES
        return (in_class and m is not None and m["cls"] == p.parent.name) or p == root / PHANTOM_STAMP

    return sorted(p for p in root.rglob("*") if not p.is_dir() and not ours(p))


def write_phantom(
    out: str | Path, n_per_class: int, seed: int = 0, size: int = 256, overwrite: bool = False
) -> list[Path]:
    """Write ``n_per_class`` phantoms per class in the Kaggle BUSI layout into the folder ``out``.

    Files: ``OUT/<class>/<class> (N).png`` (RGB) and ``OUT/<class>/<class> (N)_mask.png`` (mode ``L``,
    0/255), N = 1..n_per_class. Image N of a class uses ``default_rng([seed, class_index, N])``, so it does
    not depend on ``n_per_class``; the same arguments give byte-identical files. ``out`` must be new or
    empty; ``overwrite`` replaces phantom data there (a folder holding other files is always refused).
    Everything is written into a folder beside ``out`` and renamed into place at the end, so an
    interrupted or failed run leaves ``out`` as it was. Returns the image paths (class order, then N).
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) or n_per_class < 1:
        raise ValueError(f"n_per_class must be an integer >= 1, got {n_per_class!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ValueError(f"size must be an integer >= {_MIN_SIZE}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a folder: phantom data goes into a folder")
    held = sorted(p for p in root.rglob("*") if not p.is_dir()) if root.is_dir() else []
    if held and not overwrite:
        raise ValueError(
            f"{root} is not empty ({len(held)} files, e.g. {held[0].relative_to(root)}): choose a new or "
            "empty folder, or replace its phantom data with busdiff data phantom --overwrite"
        )
    foreign = _not_phantom(root) if held else []
    if foreign:
        raise ValueError(
            f"{root} holds files that are not phantom data (e.g. {foreign[0].relative_to(root)}), which "
            "--overwrite never deletes: choose a new or empty folder"
        )
    full = root.resolve()
    full.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (full.with_name(f".{full.name}.{what}-{os.getpid()}") for what in ("partial", "replaced"))
    shutil.rmtree(tmp, ignore_errors=True)
    paths: list[Path] = []
    try:
        for ci, label in enumerate(CLASSES):
            (tmp / label).mkdir(parents=True)
            for i in range(1, int(n_per_class) + 1):
                img, mask = render_phantom(label, np.random.default_rng([int(seed), ci, i]), int(size))
                Image.fromarray(img).convert("RGB").save(tmp / label / f"{label} ({i}).png", format="PNG")
                Image.fromarray(mask).save(tmp / label / f"{label} ({i})_mask.png", format="PNG")
                paths.append(root / label / f"{label} ({i}).png")
        if full.exists():  # empty, or phantom data being replaced
            os.rename(full, old)
        try:
            os.rename(tmp, full)
        except BaseException:
            if old.exists():
                os.rename(old, full)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def write_phantom_once(out: str | Path, n_per_class: int, seed: int = 0, size: int = 256) -> bool:
    """:func:`write_phantom` into ``out`` unless it already holds exactly that data (its stamp file says
    so): True when it wrote. Phantom data of other arguments is replaced (a study's own data, e.g. after
    its phantom section changed, or a run killed before it wrote the stamp); a folder holding anything
    else is refused rather than merged into."""
    root = Path(out)
    recipe = {"n_per_class": int(n_per_class), "seed": int(seed), "size": int(size)}
    stamp = root / PHANTOM_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return False
    write_phantom(root, n_per_class, seed=seed, size=size, overwrite=True)
    stamp.write_text(json.dumps(recipe) + "\n")
    return True

"""A physical simulator of dusty solar videos, with ground truth.

The model, in the order the light meets it:

1. **The Sun** (fixed to the Sun, so it moves with the drift): limb darkening
   ``I(mu) = 1 - u (1 - mu)`` over a large disk (optionally with the limb and
   the sky beyond it in the field), a fine texture a few pixels across
   (H-alpha fibrils and mottles, white-light granulation or Ca K network),
   and dark solar features that are *not* dust: sunspots (umbra + filamentary
   penumbra, 10-40 px across) and pores (3-8 px).
2. **Telescope motion and seeing**: frame ``i`` shows the Sun shifted by
   ``shifts[i] = (dy, dx)`` (a linear drift of ``drift_px`` in total plus a
   random jitter of ``jitter_px`` rms per axis, sub-pixel) and blurred by a
   Gaussian whose sigma varies around ``seeing_blur_px``. Shift and blur are
   one multiplication of the Sun's precomputed spectrum, rendered on a padded,
   edge-tapered canvas (so nothing wraps into the field) and cropped.
3. **Dust** (fixed to the sensor): a multiplicative attenuation, the *true
   flat*. Each particle's silhouette (a small irregular ellipse) is convolved
   with the pupil footprint at its distance from the sensor: a disk of
   diameter ``distance / f_ratio`` (an annulus with a central obstruction,
   which turns far dust into donuts). The shadow depth is the particle area
   over the footprint area, capped; a faint bright diffraction rim (gain 1-3%
   above 1) lies just outside the shadow.
4. **The camera**: shot noise (Poisson in photons, ``photons_per_adu``), read
   noise (Gaussian, ADU), rounding and clipping to ``[0, 65535]`` (never
   wrapping), uint16.

Conventions: images are ``(H, W)`` in sensor orientation (row 0 = first SER
row); flats have 1.0 = no attenuation; shifts are in pixels, ``+dy`` moves the
Sun towards higher rows. The shifts are centred (their mean is exactly 0), so
the *mean* Sun position is the unshifted one, where ``dark_feature_mask`` is
drawn. Everything is reproducible from ``SimConfig.seed``; frame ``i`` depends
only on ``(seed, i)``, so frames can be rendered in any order.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.signal import fftconvolve

__all__ = [
    "TEXTURES",
    "SimConfig",
    "Scene",
    "SimPaths",
    "make_scene",
    "render_frame",
    "iter_frames",
    "clean_sun",
    "expected_frame",
    "simulate",
]

TEXTURES = ("halpha", "white_light", "cak")

_FFT_WORKERS = max(1, min(os.cpu_count() or 1, 8))
_TAPER_PX = 16  # width of the canvas edge taper that makes the Sun canvas periodic
_EXACT_POISSON_BELOW = 200.0  # photons; above, Poisson is drawn as a Gaussian of equal variance
_LABEL_THRESHOLD = 0.01  # a dust object's label covers where it attenuates by more than 1%
_FEATURE_THRESHOLD = 0.95  # dark_feature_mask: where sunspots/pores darken the Sun by more than 5%
_SER_EPOCH = datetime(1, 1, 1)
_SER_START = datetime(2024, 6, 21, 12, 0, 0)  # nominal capture start written into the SER
_FRAME_INTERVAL_TICKS = 100_000  # 10 ms per frame, in SER's 100 ns ticks


@dataclass
class SimConfig:
    """Parameters of a simulated dusty solar video.

    Attributes
    ----------
    height, width : int
        Frame size in pixels.
    n_frames : int
        Number of frames.
    seed : int
        Seed of every random choice; the same config gives identical frames.
    f_ratio : float
        Focal ratio of the beam at the sensor; a dust particle ``d`` mm in front
        of the sensor casts a footprint ``d / f_ratio`` mm across.
    pixel_size_um : float
        Pixel pitch in micrometres.
    central_obstruction : float
        Diameter ratio of the central obstruction (0 = refractor, < 1); the
        footprint becomes an annulus and far dust casts donuts.
    n_dust : int
        Number of dust particles: about 36% near (small, 12-55% deep), 20% far
        (large faint rings, 1.5-5% deep) and the rest medium (3-10% deep).
    n_sunspots, n_pores : int
        Dark solar features (fixed to the Sun, never dust).
    drift_px : float
        Total linear drift of the Sun over the video, pixels.
    jitter_px : float
        Seeing jitter, rms per axis, pixels.
    seeing_blur_px : float
        Typical Gaussian seeing blur sigma, pixels (each frame varies around it;
        0 = no blur).
    signal_adu : float
        Mean level of the solar disk in the field, ADU.
    photons_per_adu : float
        Photo-electrons per ADU (shot noise); ``inf`` turns shot noise off.
    read_noise_adu : float
        Gaussian read noise, ADU rms.
    limb : bool
        Put the solar limb, and sky beyond it, in the field.
    texture : str
        ``"halpha"``, ``"white_light"`` or ``"cak"``.
    dust : bool
        ``False``: no dust at all (the true flat is exactly 1.0).
    """

    height: int = 480
    width: int = 640
    n_frames: int = 32
    seed: int = 0
    f_ratio: float = 30.0
    pixel_size_um: float = 3.75
    central_obstruction: float = 0.0
    n_dust: int = 25
    n_sunspots: int = 2
    n_pores: int = 6
    drift_px: float = 6.0
    jitter_px: float = 2.0
    seeing_blur_px: float = 1.0
    signal_adu: float = 30000.0
    photons_per_adu: float = 1.0
    read_noise_adu: float = 3.0
    limb: bool = False
    texture: str = "halpha"
    dust: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first parameter out of range."""
        checks = [
            (self.height >= 16 and self.width >= 16, "height and width must be >= 16"),
            (self.n_frames >= 1, "n_frames must be >= 1"),
            (self.f_ratio > 0, "f_ratio must be > 0"),
            (self.pixel_size_um > 0, "pixel_size_um must be > 0"),
            (0 <= self.central_obstruction < 1, "central_obstruction must be in [0, 1)"),
            (min(self.n_dust, self.n_sunspots, self.n_pores) >= 0, "feature counts must be >= 0"),
            (min(self.drift_px, self.jitter_px, self.seeing_blur_px) >= 0,
             "drift_px, jitter_px and seeing_blur_px must be >= 0"),
            (0 < self.signal_adu < 65535, "signal_adu must be in (0, 65535)"),
            (self.photons_per_adu > 0, "photons_per_adu must be > 0"),
            (self.read_noise_adu >= 0, "read_noise_adu must be >= 0"),
            (self.texture in TEXTURES, f"texture must be one of {', '.join(TEXTURES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SimConfig: {message}")


@dataclass
class Scene:
    """Everything fixed for a whole simulated video: the truth and the Sun.

    Attributes
    ----------
    config : SimConfig
    true_flat : ndarray, float32 (H, W)
        Sensor-fixed dust gain, 1.0 = no attenuation; exactly 1.0 away from dust.
    dust_labels : ndarray, int32 (H, W)
        ``k > 0`` where dust object ``k`` attenuates by more than 1% (the
        strongest object wins where shadows overlap); 0 elsewhere.
    dust_objects : list of dict
        Per object: ``label``, ``kind`` (near/mid/far), ``y``, ``x`` (shadow
        centre, px), ``distance_mm``, ``footprint_px`` (outer diameter of the
        pupil footprint), ``particle_px`` (equivalent diameter of the
        silhouette), ``depth`` (1 - minimum of the object's own gain), ``rim``
        (maximum of its own gain - 1), ``donut``, ``area_px`` (labelled pixels).
    dark_feature_mask : ndarray, bool (H, W)
        Sunspots and pores, in sensor coordinates at the mean Sun position
        (shift 0), where they darken the Sun by more than 5%.
    dark_features : list of dict
        Per feature: ``kind`` (sunspot/pore), ``y``, ``x`` (at the mean Sun
        position), ``radius_px`` (outer), ``umbra_radius_px``, ``depth``.
    shifts : ndarray, float (n_frames, 2)
        True ``(dy, dx)`` of the Sun in each frame, px; mean exactly 0.
    blur_sigmas : ndarray, float (n_frames,)
        Seeing blur sigma of each frame, px.
    sun : dict
        Disk geometry and texture parameters (for the record).
    pad : int
        Canvas margin: the frame at shift 0 is ``canvas[pad:pad+H, pad:pad+W]``.
    sun_canvas : ndarray, float32
        The Sun in ADU on the padded, edge-tapered canvas, at shift 0.
    """

    config: SimConfig
    true_flat: np.ndarray
    dust_labels: np.ndarray
    dust_objects: list[dict]
    dark_feature_mask: np.ndarray
    dark_features: list[dict]
    shifts: np.ndarray
    blur_sigmas: np.ndarray
    sun: dict
    pad: int
    sun_canvas: np.ndarray = field(repr=False)
    _spectrum: np.ndarray = field(repr=False)
    _fy: np.ndarray = field(repr=False)
    _fx: np.ndarray = field(repr=False)

    @property
    def dust_mask(self) -> np.ndarray:
        """bool (H, W): where any dust attenuates by more than 1%."""
        return self.dust_labels > 0


@dataclass
class SimPaths:
    """Where :func:`simulate` wrote a video and its ground truth."""

    directory: Path
    video: Path
    true_flat: Path
    dust_mask: Path
    dust_labels: Path
    dark_features: Path
    truth: Path

    @classmethod
    def in_directory(cls, directory: str | os.PathLike) -> "SimPaths":
        d = Path(directory)
        return cls(d, d / "video.ser", d / "true_flat.fits", d / "dust_mask.png",
                   d / "dust_labels.fits", d / "dark_features.png", d / "truth.json")


# --------------------------------------------------------------------------- random streams

def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per component, so changing one count leaves the rest alone."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *stream])


_STREAM_MOTION, _STREAM_DUST, _STREAM_DISK, _STREAM_TEXTURE, _STREAM_FEATURES = 1, 2, 3, 4, 5
_STREAM_FRAME = 100


# --------------------------------------------------------------------------- motion

def _motion(config: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame Sun shifts ``(dy, dx)`` (drift + jitter, mean 0) and seeing sigmas."""
    rng = _rng(config.seed, _STREAM_MOTION)
    n = config.n_frames
    angle = rng.uniform(0, 2 * np.pi)
    drift = config.drift_px * np.array([np.sin(angle), np.cos(angle)])
    t = np.linspace(-0.5, 0.5, n) if n > 1 else np.zeros(1)
    jitter = rng.normal(0.0, config.jitter_px, (n, 2)) if config.jitter_px > 0 else np.zeros((n, 2))
    jitter -= jitter.mean(axis=0)
    shifts = t[:, None] * drift[None, :] + jitter
    if config.seeing_blur_px > 0:
        sigmas = config.seeing_blur_px * np.clip(np.exp(rng.normal(0.0, 0.2, n)), 0.5, 1.8)
    else:
        sigmas = np.zeros(n)
    return shifts, sigmas


# --------------------------------------------------------------------------- dust

def _disk_occupancy(rho: np.ndarray, radius: float) -> np.ndarray:
    """Antialiased occupancy (0..1) of a disk of *radius* px, from the distance map *rho*."""
    return np.clip(radius + 0.5 - rho, 0.0, 1.0)


def _footprint(diameter_px: float, obstruction: float) -> np.ndarray:
    """The pupil footprint (disk or annulus) of outer diameter *diameter_px*, summing to 1."""
    r_out = diameter_px / 2
    if r_out < 0.5:
        return np.ones((1, 1))
    n = 2 * math.ceil(r_out + 1) + 1
    c = n // 2
    yy, xx = np.mgrid[:n, :n]
    rho = np.hypot(yy - c, xx - c)
    occ = _disk_occupancy(rho, r_out)
    if obstruction > 0:
        occ = occ - _disk_occupancy(rho, obstruction * r_out)
    occ = np.clip(occ, 0.0, None)
    return occ / occ.sum()


def _silhouette(rng: np.random.Generator, radius_px: float, offset: tuple[float, float],
                size: int, supersample: int = 5) -> np.ndarray:
    """Occupancy (0..1) of an irregular elliptical particle of equivalent *radius_px*.

    Drawn on a ``size x size`` patch whose centre pixel is the particle centre
    minus *offset* (the sub-pixel part of its position), supersampled.
    """
    q = rng.uniform(0.5, 1.0)  # axis ratio
    alpha = rng.uniform(0, np.pi)
    a, b = radius_px / math.sqrt(q), radius_px * math.sqrt(q)
    harmonics = [(m, rng.uniform(0, 0.12), rng.uniform(0, 2 * np.pi)) for m in (2, 3, 4, 5)]
    s = supersample
    coords = (np.arange(size * s) + 0.5) / s - size / 2  # pixel centres at ..., -1, 0, 1, ...
    yy = coords[:, None] - offset[0]
    xx = coords[None, :] - offset[1]
    u = xx * math.cos(alpha) + yy * math.sin(alpha)
    v = -xx * math.sin(alpha) + yy * math.cos(alpha)
    theta = np.arctan2(v, u)
    rho = np.hypot(u, v)
    edge = a * b / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2)
    edge = edge * (1 + sum(c * np.cos(m * theta + p) for m, c, p in harmonics))
    inside = (rho <= edge).astype(np.float64)
    occ = inside.reshape(size, s, size, s).mean(axis=(1, 3))
    if occ.sum() == 0:  # a particle smaller than the supersampled grid: keep its area
        occ[size // 2, size // 2] = min(1.0, np.pi * radius_px ** 2)
    return occ


def _dust_plan(config: SimConfig) -> list[tuple[str, float, float]]:
    """(kind, distance_mm, depth) for each particle: near-strong, mid-medium, far-faint rings."""
    rng = _rng(config.seed, _STREAM_DUST, 0)
    n = config.n_dust
    n_far = int(round(0.20 * n))
    n_near = int(round(0.36 * n))
    if n >= 3:
        n_far, n_near = max(n_far, 1), max(n_near, 1)
    n_near = min(n_near, n)
    n_far = min(n_far, n - n_near)
    n_mid = n - n_near - n_far
    pixel_mm = config.pixel_size_um * 1e-3
    # far footprints stay within 60% of the smaller frame side
    d_cap = 0.6 * min(config.height, config.width) * pixel_mm * config.f_ratio
    plan = []
    for kind, count, (d0, d1), (z0, z1) in [
        ("far", n_far, (5.0, 15.0), (0.015, 0.05)),
        ("mid", n_mid, (1.5, 4.0), (0.03, 0.10)),
        ("near", n_near, (0.3, 1.5), (0.12, 0.55)),
    ]:
        hi = min(d1, d_cap)
        lo = min(d0, 0.5 * hi)
        for _ in range(count):
            plan.append((kind, float(rng.uniform(lo, hi)), float(rng.uniform(z0, z1))))
    return plan


def _dust_patch(rng: np.random.Generator, config: SimConfig, distance_mm: float, depth: float,
                frac: tuple[float, float]) -> dict[str, Any]:
    """One particle's attenuation ``a`` (peak = *depth*) and rim gain ``r`` on a square patch.

    The patch's centre pixel holds the particle's integer position; *frac* is
    the sub-pixel remainder. The object's own gain is ``1 - a + r``.
    """
    d_px = distance_mm / config.f_ratio / (config.pixel_size_um * 1e-3)
    obstruction = config.central_obstruction
    fp_area = np.pi * (d_px / 2) ** 2 * (1 - obstruction ** 2)
    # depth = particle area / footprint area (a particle at least one pixel wide near focus)
    particle_r = max(math.sqrt(depth * max(fp_area, 1.0) / np.pi), 0.5)
    sil_size = 2 * math.ceil(particle_r * 1.4 + 1.5) + 1
    sil = _silhouette(rng, particle_r, frac, sil_size)
    fp = _footprint(d_px, obstruction)
    shadow = fftconvolve(sil, fp, mode="full")
    outline = fftconvolve(sil, _footprint(d_px, 0.0), mode="full") if obstruction > 0 else shadow
    rim_sigma = float(np.clip(0.08 * d_px, 0.7, 3.0))
    margin = math.ceil(4 * rim_sigma) + 1
    shadow = np.pad(shadow, margin)
    outline = np.pad(outline, margin)
    peak = shadow.max()
    a = shadow * (depth / peak)
    # rim: where a slight blur of the filled shadow spreads outward, just outside its edge
    filled = outline / outline.max()
    spread = np.clip(ndimage.gaussian_filter(filled, rim_sigma, mode="constant") - filled, 0.0, None)
    spread[filled > 0.5] = 0.0
    rim_amp = float(np.clip(rng.uniform(0.3, 0.6) * depth, 0.004, 0.03)) * rng.uniform(0.8, 1.0)
    r = rim_amp * spread / spread.max() if spread.max() > 0 else np.zeros_like(spread)
    a[a < 1e-5] = 0.0
    r[r < 1e-5] = 0.0
    c = a.shape[0] // 2
    centre_att = a[c, c]
    donut = bool(obstruction > 0 and d_px >= 6 and centre_att < 0.7 * a.max())
    return {"a": a, "r": r, "footprint_px": float(d_px), "particle_px": float(2 * particle_r),
            "donut": donut}


def _make_dust(config: SimConfig) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """True flat, dust labels and object records (exactly 1.0 / 0 away from every shadow)."""
    h, w = config.height, config.width
    flat = np.ones((h, w), dtype=np.float64)
    labels = np.zeros((h, w), dtype=np.int32)
    if not config.dust or config.n_dust == 0:
        return flat.astype(np.float32), labels, []
    best = np.zeros((h, w), dtype=np.float64)  # strongest attenuation so far, for labels
    rng = _rng(config.seed, _STREAM_DUST, 1)
    placed: list[tuple[float, float, float]] = []  # (y, x, radius)
    objects = []
    for k, (kind, distance, depth) in enumerate(_dust_plan(config), start=1):
        probe = _dust_patch(_rng(config.seed, _STREAM_DUST, 2, k), config, distance, depth, (0.0, 0.0))
        radius = 0.5 * (probe["footprint_px"] + probe["particle_px"]) + 1
        margin = min(radius, 0.25 * min(h, w))
        best_pos, best_gap = None, -np.inf
        for _ in range(200):
            y = rng.uniform(margin, h - 1 - margin)
            x = rng.uniform(margin, w - 1 - margin)
            gap = min((math.hypot(y - py, x - px) - radius - pr for py, px, pr in placed), default=np.inf)
            if gap > best_gap:
                best_pos, best_gap = (y, x), gap
            if gap > 2:
                break
        y, x = best_pos
        placed.append((y, x, radius))
        iy, ix = int(round(y)), int(round(x))
        patch = _dust_patch(_rng(config.seed, _STREAM_DUST, 2, k), config, distance, depth,
                            (y - iy, x - ix))
        a, r = patch["a"], patch["r"]
        gain = 1.0 - a + r
        c = a.shape[0] // 2
        y0, x0 = iy - c, ix - c
        sy0, sx0 = max(y0, 0), max(x0, 0)
        sy1, sx1 = min(y0 + a.shape[0], h), min(x0 + a.shape[1], w)
        win = (slice(sy0, sy1), slice(sx0, sx1))
        loc = (slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0))
        flat[win] *= gain[loc]
        mine = (a[loc] > _LABEL_THRESHOLD) & (a[loc] > best[win])
        labels[win][mine] = k
        best[win] = np.maximum(best[win], a[loc])
        objects.append({
            "label": k, "kind": kind, "y": float(y), "x": float(x),
            "distance_mm": float(distance), "footprint_px": patch["footprint_px"],
            "particle_px": patch["particle_px"], "depth": float(a.max()),
            "rim": float(gain.max() - 1.0), "donut": patch["donut"],
        })
    for obj in objects:
        obj["area_px"] = int(np.count_nonzero(labels == obj["label"]))
    return flat.astype(np.float32), labels, objects


# --------------------------------------------------------------------------- the Sun

@dataclass(frozen=True)
class _Look:
    """How the Sun looks in one passband."""

    limb_darkening: float  # u in I(mu) = 1 - u (1 - mu)
    umbra: float  # intensity factors relative to the quiet Sun
    penumbra: float
    pore: tuple[float, float]
    sky: float  # scattered light beyond the limb, relative to the disk


_LOOKS = {
    "white_light": _Look(0.60, 0.22, 0.75, (0.55, 0.75), 0.010),
    "halpha": _Look(0.25, 0.45, 0.80, (0.60, 0.80), 0.020),
    "cak": _Look(0.35, 0.50, 0.82, (0.60, 0.80), 0.015),
}


def _freqs(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Frequency grids (cycles/px) of an rfft2 of *shape*: fy (n, 1), fx (1, m//2+1)."""
    return sfft.fftfreq(shape[0])[:, None], sfft.rfftfreq(shape[1])[None, :]


def _filtered_noise(spectrum: np.ndarray, transfer: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Real field with the given spectrum x transfer, normalised to zero mean, unit rms."""
    field_ = sfft.irfft2(spectrum * transfer, s=shape, workers=_FFT_WORKERS).astype(np.float32)
    field_ -= field_.mean()
    field_ /= max(float(field_.std()), 1e-12)
    return field_


def _bandpass(f: np.ndarray, f0: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((f - f0) / width) ** 2).astype(np.float32)


def _texture(kind: str, shape: tuple[int, int], rng: np.random.Generator,
             spots: list[tuple[float, float, float]]) -> np.ndarray:
    """Zero-mean relative intensity texture of the quiet Sun (float32, rms a few %)."""
    white = sfft.rfft2(rng.standard_normal(shape, dtype=np.float32), workers=_FFT_WORKERS)
    fy, fx = _freqs(shape)
    f = np.hypot(fy, fx).astype(np.float32)
    large = _filtered_noise(white, np.exp(-0.5 * (f / 0.004) ** 2), shape)  # ~250 px patches
    white2 = sfft.rfft2(rng.standard_normal(shape, dtype=np.float32), workers=_FFT_WORKERS)
    if kind == "white_light":
        # granulation: bright cells ~7 px separated by dark lanes (zero crossings of band noise)
        cells = np.abs(_filtered_noise(white2, _bandpass(f, 1 / 7.0, 0.35 / 7.0), shape))
        cells = ndimage.gaussian_filter(cells, 0.6)
        cells = (cells - cells.mean()) / cells.std()
        meso = _filtered_noise(white2, _bandpass(f, 1 / 40.0, 0.5 / 40.0), shape)
        return (0.035 * cells + 0.008 * meso + 0.01 * large).astype(np.float32)
    if kind == "cak":
        # chromospheric network: bright lanes around ~35 px supergranules, with bright points
        n = _filtered_noise(white2, _bandpass(f, 1 / 35.0, 0.4 / 35.0), shape)
        network = np.exp(-((n / 0.35) ** 2))
        points = _filtered_noise(white, _bandpass(f, 1 / 5.0, 0.3 / 5.0), shape)
        network = network * (1 + 0.6 * np.clip(points, 0, None))
        network = (network - network.mean()) / network.std()
        fine = _filtered_noise(white2, _bandpass(f, 1 / 6.0, 0.4 / 6.0), shape)
        return (0.08 * network + 0.02 * fine + 0.03 * large).astype(np.float32)
    # H-alpha: dark elongated fibrils following a smooth orientation field (radial around
    # sunspots, like superpenumbral fibrils), on mottles and large bright/dark patches
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    orient = np.pi * _filtered_noise(white2, np.exp(-0.5 * (f / 0.006) ** 2), shape)
    for sy, sx, sr in spots:
        weight = np.exp(-(((yy - sy) ** 2 + (xx - sx) ** 2) / (2 * (3.0 * sr) ** 2)))
        radial = np.arctan2(yy - sy, xx - sx)
        # blend angles through their doubled-angle vectors (orientation is mod pi)
        vy = (1 - weight) * np.sin(2 * orient) + weight * np.sin(2 * radial)
        vx = (1 - weight) * np.cos(2 * orient) + weight * np.cos(2 * radial)
        orient = (0.5 * np.arctan2(vy, vx)).astype(np.float32)
    n_dir = 6
    fibrils = np.zeros(shape, dtype=np.float32)
    wsum = np.zeros(shape, dtype=np.float32)
    w2sum = np.zeros(shape, dtype=np.float32)
    for j in range(n_dir):
        th = np.pi * j / n_dir
        k_par = fy * np.cos(th) + fx * np.sin(th)  # along the fibril: long (~25 px)
        k_perp = -fy * np.sin(th) + fx * np.cos(th)  # across it: ~3-4 px wide
        transfer = (np.exp(-0.5 * (k_par / 0.012) ** 2) * np.exp(-0.5 * (k_perp / 0.12) ** 2)
                    * (1 - np.exp(-0.5 * (k_perp / 0.03) ** 2))).astype(np.float32)
        part = _filtered_noise(white2 if j % 2 else white, transfer, shape)
        wj = np.cos(orient - th) ** 8
        fibrils += wj * part
        wsum += wj
        w2sum += wj * wj
    fibrils /= np.sqrt(np.maximum(w2sum, 1e-6))
    fibrils = fibrils - 0.25 * (np.clip(fibrils, 0, None) ** 2)  # darker, narrower fibrils
    fibrils = (fibrils - fibrils.mean()) / fibrils.std()
    mottles = _filtered_noise(white2, _bandpass(f, 1 / 14.0, 0.5 / 14.0), shape)
    amplitude = np.clip(1 + 0.35 * large, 0.4, None)
    return (amplitude * (0.055 * fibrils + 0.025 * mottles) + 0.03 * large).astype(np.float32)


def _place_features(config: SimConfig, forbidden: np.ndarray, rng: np.random.Generator,
                    on_disk) -> list[dict]:
    """Positions (sensor coordinates, mean Sun position) and sizes of sunspots and pores."""
    h, w = config.height, config.width
    side = min(h, w)
    specs = []
    for _ in range(config.n_sunspots):
        r = float(min(rng.uniform(5.0, 20.0), max(side / 6.0, 5.0)))
        specs.append(("sunspot", r, float(rng.uniform(0.35, 0.5) * r)))
    for _ in range(config.n_pores):
        specs.append(("pore", float(rng.uniform(1.5, 4.0)), 0.0))
    grown = ndimage.binary_dilation(forbidden, iterations=3) if forbidden.any() else forbidden
    integral = np.pad(grown.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def overlap(y: float, x: float, r: float) -> int:
        y0, y1 = max(int(y - r), 0), min(int(y + r) + 2, h)
        x0, x1 = max(int(x - r), 0), min(int(x + r) + 2, w)
        return int(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])

    features: list[dict] = []
    for kind, r, ru in specs:
        margin = min(r + 3, side / 2 - 1)
        best, best_cost = None, np.inf
        for _ in range(300):
            y = rng.uniform(margin, h - 1 - margin)
            x = rng.uniform(margin, w - 1 - margin)
            crowd = sum(max(0.0, f["radius_px"] + r + 4 - math.hypot(y - f["y"], x - f["x"]))
                        for f in features)
            cost = overlap(y, x, r + 1) + crowd + (0 if on_disk(y, x, r + 4) else 1e6)
            if cost < best_cost:
                best, best_cost = (y, x), cost
            if cost == 0:
                break
        features.append({"kind": kind, "y": float(best[0]), "x": float(best[1]),
                         "radius_px": r, "umbra_radius_px": ru})
    return features


def _feature_patch(feature: dict, look: _Look, rng: np.random.Generator,
                   frac: tuple[float, float]) -> np.ndarray:
    """Multiplicative intensity factor (<= 1) of one sunspot or pore on a square patch."""
    r = feature["radius_px"]
    half = math.ceil(r + 4)
    yy, xx = np.mgrid[-half: half + 1, -half: half + 1].astype(np.float64)
    yy -= frac[0]
    xx -= frac[1]
    q = rng.uniform(0.7, 1.0)
    alpha = rng.uniform(0, np.pi)
    u = (xx * math.cos(alpha) + yy * math.sin(alpha)) / math.sqrt(q)
    v = (-xx * math.sin(alpha) + yy * math.cos(alpha)) * math.sqrt(q)
    theta = np.arctan2(v, u)
    rho = np.hypot(u, v)

    def wobble(amp: float, orders) -> np.ndarray:
        return 1 + sum(rng.uniform(0, amp) * np.cos(m * theta + rng.uniform(0, 2 * np.pi))
                       for m in orders)

    if feature["kind"] == "pore":
        level = rng.uniform(*look.pore)
        occ = _disk_occupancy(rho, r * wobble(0.08, (2, 3)))
        factor = 1 - (1 - level) * occ
    else:
        pen = _disk_occupancy(rho, r * wobble(0.08, (2, 3, 4)))
        umb = _disk_occupancy(rho, feature["umbra_radius_px"] * wobble(0.12, (2, 3)))
        filaments = 1 + 0.1 * sum(np.cos(m * theta + rng.uniform(0, 2 * np.pi))
                                  for m in rng.integers(12, 40, 4)) / 2
        pen_level = np.clip(look.penumbra * filaments, 0, 1)
        umbra_level = look.umbra * (0.85 + 0.15 * np.clip(rho / max(feature["umbra_radius_px"], 1), 0, 1))
        factor = 1 - pen * (1 - pen_level)
        factor = factor * (1 - umb) + umb * umbra_level
    return 1 - ndimage.gaussian_filter(1 - factor, 0.5, mode="constant")


def _taper(n: int, width: int) -> np.ndarray:
    w = np.ones(n)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(width) + 0.5) / width)
    w[:width] = ramp
    w[n - width:] = np.minimum(w[n - width:], ramp[::-1])
    return w


def _make_sun(config: SimConfig, pad: int, canvas_shape: tuple[int, int],
              dust_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """The Sun in ADU on the padded canvas, the feature mask (sensor, shift 0), features, geometry."""
    h, w = config.height, config.width
    look = _LOOKS[config.texture]
    rng = _rng(config.seed, _STREAM_DISK)
    fc = (pad + (h - 1) / 2, pad + (w - 1) / 2)  # field centre on the canvas
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    if config.limb:
        radius = 2.0 * max(h, w)
        centre = np.array(fc) - direction * (radius - 0.25 * min(h, w))
    else:
        radius = 4.0 * max(h, w)
        centre = np.array(fc) - direction * 0.45 * radius

    def on_disk(y: float, x: float, margin: float) -> bool:
        return math.hypot(y + pad - centre[0], x + pad - centre[1]) < radius - margin

    features = _place_features(config, dust_labels > 0, _rng(config.seed, _STREAM_FEATURES, 0), on_disk)
    yy, xx = np.ogrid[: canvas_shape[0], : canvas_shape[1]]
    dist = np.hypot((yy - centre[0]).astype(np.float32), (xx - centre[1]).astype(np.float32))
    mu = np.sqrt(np.clip(1 - (dist / radius) ** 2, 0, 1))
    darkening = 1 - look.limb_darkening * (1 - mu)
    disk = 0.5 * (1 - np.tanh((dist - radius) / 1.0))  # limb about a pixel wide
    sky = look.sky * np.exp(-np.clip(dist - radius, 0, None) / (0.3 * min(h, w)))

    factor = np.ones(canvas_shape, dtype=np.float32)
    for i, feat in enumerate(features):
        cy, cx = feat["y"] + pad, feat["x"] + pad
        iy, ix = int(round(cy)), int(round(cx))
        patch = _feature_patch(feat, look, _rng(config.seed, _STREAM_FEATURES, 1, i), (cy - iy, cx - ix))
        c = patch.shape[0] // 2
        factor[iy - c: iy + c + 1, ix - c: ix + c + 1] *= patch.astype(np.float32)
        feat["depth"] = float(1 - patch.min())
    spots = [(f["y"] + pad, f["x"] + pad, f["radius_px"]) for f in features if f["kind"] == "sunspot"]
    texture = _texture(config.texture, canvas_shape, _rng(config.seed, _STREAM_TEXTURE), spots)

    sun = darkening * factor * (1 + texture * factor ** 2)
    sun = (disk * sun + (1 - disk) * sky).astype(np.float32)
    field_view = (slice(pad, pad + h), slice(pad, pad + w))
    on = disk[field_view] > 0.5
    level = float(sun[field_view][on].mean()) if on.any() else float(sun[field_view].mean())
    sun *= np.float32(config.signal_adu / level)
    # taper the canvas edges to its mean so the periodic FFT canvas has no seam
    mean = float(sun.mean())
    window = np.outer(_taper(canvas_shape[0], _TAPER_PX), _taper(canvas_shape[1], _TAPER_PX))
    sun = (mean + (sun - mean) * window).astype(np.float32)
    mask = factor[field_view] < _FEATURE_THRESHOLD
    geometry = {"disk_center_yx": [float(centre[0] - pad), float(centre[1] - pad)],
                "disk_radius_px": float(radius), "limb_darkening_u": look.limb_darkening,
                "texture": config.texture, "disk_level_normaliser": level}
    return sun, mask, features, geometry


# --------------------------------------------------------------------------- public API

def make_scene(config: SimConfig | None = None) -> Scene:
    """Build everything fixed for a video: motion, dust (true flat), the Sun and its features.

    Parameters
    ----------
    config : SimConfig, optional
        Defaults to ``SimConfig()``.

    Returns
    -------
    Scene
    """
    config = config or SimConfig()
    config.validate()
    shifts, sigmas = _motion(config)
    true_flat, labels, objects = _make_dust(config)
    max_shift = float(np.abs(shifts).max()) if shifts.size else 0.0
    pad = math.ceil(max_shift + 4 * float(sigmas.max())) + _TAPER_PX + 2
    canvas_shape = (sfft.next_fast_len(config.height + 2 * pad),
                    sfft.next_fast_len(config.width + 2 * pad, real=True))
    sun, feature_mask, features, geometry = _make_sun(config, pad, canvas_shape, labels)
    spectrum = sfft.rfft2(sun, workers=_FFT_WORKERS).astype(np.complex64)
    fy, fx = _freqs(canvas_shape)
    return Scene(config=config, true_flat=true_flat, dust_labels=labels, dust_objects=objects,
                 dark_feature_mask=feature_mask, dark_features=features, shifts=shifts,
                 blur_sigmas=sigmas, sun=geometry, pad=pad, sun_canvas=sun, _spectrum=spectrum,
                 _fy=fy.ravel(), _fx=fx.ravel())


def _check_index(scene: Scene, index: int) -> int:
    n = scene.config.n_frames
    if not -n <= index < n:
        raise IndexError(f"frame {index} out of range (video has {n} frames)")
    return index % n


def clean_sun(scene: Scene, index: int) -> np.ndarray:
    """The noise-free, dust-free Sun of frame *index* in ADU: float32 ``(H, W)``.

    Shifted and seeing-blurred exactly as in :func:`render_frame`, but neither
    multiplied by the true flat nor noisy: the ideal calibrated frame.
    """
    index = _check_index(scene, index)
    h, w, pad = scene.config.height, scene.config.width, scene.pad
    dy, dx = (float(v) for v in scene.shifts[index])
    sigma = float(scene.blur_sigmas[index])
    if dy == 0 and dx == 0 and sigma == 0:
        return scene.sun_canvas[pad: pad + h, pad: pad + w].copy()
    two_pi2s2 = 2 * np.pi ** 2 * sigma ** 2
    ay = np.exp(-2j * np.pi * scene._fy * dy - two_pi2s2 * scene._fy ** 2).astype(np.complex64)
    ax = np.exp(-2j * np.pi * scene._fx * dx - two_pi2s2 * scene._fx ** 2).astype(np.complex64)
    spec = np.multiply(scene._spectrum, ay[:, None])
    spec *= ax[None, :]
    shape = scene.sun_canvas.shape
    out = sfft.irfft2(spec, s=shape, workers=_FFT_WORKERS, overwrite_x=True)
    return np.ascontiguousarray(out[pad: pad + h, pad: pad + w], dtype=np.float32)


def expected_frame(scene: Scene, index: int) -> np.ndarray:
    """The noise-free frame *index* in ADU (clean Sun x true flat), float32, unclipped."""
    sun = clean_sun(scene, index)
    sun *= scene.true_flat
    return sun


def render_frame(scene: Scene, index: int) -> np.ndarray:
    """Frame *index* as the camera records it: uint16 ``(H, W)``.

    The expected signal (:func:`expected_frame`) with shot noise (exact Poisson
    below 200 photons, a Gaussian of the same variance above, where the two are
    indistinguishable after rounding) and Gaussian read noise, rounded and
    clipped to ``[0, 65535]``. Deterministic given ``(seed, index)``.
    """
    index = _check_index(scene, index)
    cfg = scene.config
    rng = _rng(cfg.seed, _STREAM_FRAME, index)
    signal = expected_frame(scene, index)
    np.maximum(signal, 0, out=signal)
    ppa = cfg.photons_per_adu
    shot = math.isfinite(ppa)
    variance = signal / np.float32(ppa) if shot else np.zeros_like(signal)
    variance += np.float32(cfg.read_noise_adu ** 2)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    noise *= np.sqrt(variance, out=variance)
    out = signal + noise
    if shot:
        low = signal * np.float32(ppa) < _EXACT_POISSON_BELOW
        if low.any():
            photons = rng.poisson(signal[low].astype(np.float64) * ppa)
            read = rng.standard_normal(photons.shape) * cfg.read_noise_adu
            out[low] = photons / ppa + read
    np.rint(out, out=out)
    np.clip(out, 0, 65535, out=out)
    return out.astype(np.uint16)


def iter_frames(scene: Scene, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    """Yield frames ``start .. stop-1`` (default: all) as uint16 arrays, one at a time."""
    stop = scene.config.n_frames if stop is None else min(stop, scene.config.n_frames)
    for i in range(start, stop):
        yield render_frame(scene, i)


def _versions() -> dict[str, str]:
    import astropy
    import scipy

    from . import __version__

    return {"aiflat_local": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "astropy": astropy.__version__, "python": platform.python_version()}


def truth_dict(scene: Scene, paths: SimPaths | None = None) -> dict[str, Any]:
    """The JSON-ready ground truth of *scene* (what ``truth.json`` holds)."""
    out: dict[str, Any] = {
        "format": "aiflat-local simulated truth",
        "format_version": 1,
        "conventions": {
            "orientation": "row 0 = first SER row (sensor orientation)",
            "flat": "gain, 1.0 = no attenuation, exactly 1.0 away from dust",
            "shifts": "(dy, dx) of the Sun in each frame, px, mean 0; dark features drawn at shift 0",
            "labels": f"dust object k where it attenuates by more than {_LABEL_THRESHOLD:.0%}",
        },
        "config": asdict(scene.config),
        "objects": scene.dust_objects,
        "dark_features": scene.dark_features,
        "shifts": [[float(dy), float(dx)] for dy, dx in scene.shifts],
        "blur_sigmas": [float(s) for s in scene.blur_sigmas],
        "sun": scene.sun,
        "versions": _versions(),
    }
    if paths is not None:
        out["files"] = {k: Path(getattr(paths, k)).name for k in
                        ("video", "true_flat", "dust_mask", "dust_labels", "dark_features")}
    return out


def simulate(out_dir: str | os.PathLike, config: SimConfig | None = None,
             progress: bool = False) -> SimPaths:
    """Write a simulated dusty solar video and its ground truth into *out_dir*.

    Frames are rendered and streamed into ``video.ser`` (16-bit mono) one at a
    time, never all held in memory. Beside it: ``true_flat.fits`` (float32),
    ``dust_labels.fits`` (int32), ``dust_mask.png`` and ``dark_features.png``
    (8-bit, 255 = set) and ``truth.json`` (config, dust objects, dark
    features, shifts, versions). Every file is written atomically.

    Returns
    -------
    SimPaths
    """
    from tqdm import tqdm

    from .io import write_fits, write_mask
    from .io._atomic import atomic_path, check_writable_dir
    from .io.ser import SerHeader, SerWriter

    config = config or SimConfig()
    paths = SimPaths.in_directory(out_dir)
    check_writable_dir(paths.directory)
    scene = make_scene(config)
    h, w, n = config.height, config.width, config.n_frames
    start = (_SER_START - _SER_EPOCH).days * 864_000_000_000 + (_SER_START - _SER_EPOCH).seconds * 10_000_000
    header = SerHeader(color_id=0, little_endian_flag=0, width=w, height=h, pixel_depth=16,
                       frame_count=0, observer="aiflat-local simulator",
                       instrument=f"simulated {config.texture} seed {config.seed}",
                       telescope=f"f/{config.f_ratio:g} simulated", date_time=start,
                       date_time_utc=start)
    stamps = [start + i * _FRAME_INTERVAL_TICKS for i in range(n)]
    with SerWriter(paths.video, width=w, height=h, dtype=np.uint16, like=header,
                   timestamps=stamps) as writer:
        for frame in tqdm(iter_frames(scene), total=n, disable=not progress,
                          desc="simulating", unit="frame"):
            writer.write(frame)
    write_fits(paths.true_flat, scene.true_flat)
    write_fits(paths.dust_labels, scene.dust_labels)
    write_mask(paths.dust_mask, scene.dust_mask)
    write_mask(paths.dark_features, scene.dark_feature_mask)
    with atomic_path(paths.truth) as tmp:
        tmp.write_text(json.dumps(truth_dict(scene, paths), indent=1))
    return paths

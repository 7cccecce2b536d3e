"""A physical simulator of dusty solar videos, with ground truth.

Used by the tests, the ``demo`` command and the benchmarks; it needs no data and
no network. One :class:`SimConfig` (plus its ``seed``) fully determines a video.

The model
---------
*The Sun* is rendered once on a canvas larger than the sensor (the margin covers
the largest shift plus the seeing blur) and kept as its 2-D Fourier spectrum:

- large scale: limb darkening ``I(mu) = 1 - u (1 - mu)`` of a disk much larger than
  the field; with ``limb=True`` the limb crosses the field and a faint sky
  (scattered light, 2 % of the disk) lies beyond it;
- texture: granulation a few pixels across (``white_light``); H-alpha fibrils
  and mottles plus bright plage and dark filament channels tens of pixels long
  (``halpha``); or the Ca II K network, bright grains and plage (``cak``);
- dark solar features, fixed to the Sun: sunspots (irregular umbra + filamentary
  penumbra, 10-40 px across) and pores (3-8 px). They are **not** dust.

*Frame i* is the Sun shifted by ``shifts[i] = drift + jitter`` (sub-pixel, by a
Fourier phase ramp), blurred by a Gaussian of ``blur_sigmas[i]`` (seeing, applied
in the same Fourier product), cropped to the sensor, multiplied by the true flat,
then given shot noise (Poisson photon counts via ``photons_per_adu``: exact
Poisson below 30 photons, its Gaussian approximation above) and Gaussian read
noise, rounded and clipped to ``[0, 65535]`` (clipped, never wrapped).

*Dust* is fixed to the sensor: a multiplicative attenuation ``true_flat`` (1.0 =
no attenuation). Each particle is an opaque irregular elliptical silhouette
convolved with the pupil footprint at its distance ``d`` from the sensor: a disk
of diameter ``d / f_ratio`` (``pixel_size_um`` converts it to pixels), an annulus
when the telescope has a central obstruction, so far dust casts donuts. The
shadow depth is the particle area over the footprint area (capped at 40-60 %
for near dust: particles are not perfectly opaque). A faint bright diffraction
rim (gain 1.005-1.03) lies just outside each shadow. Near dust (< 1 mm) gives
small, dark spots; dust a few millimetres away gives large, faint rings.

Conventions
-----------
- Arrays are ``(H, W)`` in sensor orientation: row 0 is the first SER row.
- ``shifts[i] = (dy, dx)`` in pixels: frame ``i`` shows at sensor pixel
  ``(y, x)`` what the zero-shift frame shows at ``(y - dy, x - dx)`` (the Sun
  moves by ``+dy`` rows, ``+dx`` columns).
- Dust objects and dark features are given in sensor pixels; dark features at
  the mean Sun position, which is the zero shift (``shifts`` has mean exactly 0).
- Everything is seeded: the same config gives bit-identical frames, and frame
  ``i`` depends only on ``(config, i)``, not on which frames were made before.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import scipy.fft as sfft
from scipy import ndimage, special

__all__ = ["SimConfig", "Scene", "SimPaths", "make_scene", "render_frame", "iter_frames",
           "clean_sun", "expected_frame", "simulate", "TEXTURES"]

#: Simulator model version, written to ``truth.json``; bump when the output of a seed changes.
SIM_VERSION = 1
TEXTURES = ("halpha", "white_light", "cak")
FRAME_RATE_HZ = 50.0  # for the SER timestamps only
_START_TIME = _dt.datetime(2024, 6, 21, 12, 0, 0)  # UTC, for the SER header and timestamps
_WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
_POISSON_BELOW = 30.0  # photons: exact Poisson below, Gaussian approximation above
# Limb-darkening coefficient u of I(mu) = 1 - u (1 - mu), and spot levels, per texture.
_LIMB_U = {"white_light": 0.60, "halpha": 0.25, "cak": 0.35}
_UMBRA = {"white_light": (0.18, 0.30), "halpha": (0.40, 0.50), "cak": (0.40, 0.50)}
_PENUMBRA = {"white_light": (0.72, 0.80), "halpha": (0.72, 0.82), "cak": (0.74, 0.84)}
# Dust classes: distance from the sensor (mm) and target depth (particle / footprint area).
_DUST_CLASSES = {
    "near": {"distance_mm": (0.15, 1.0), "depth": (0.12, 1.2)},
    "medium": {"distance_mm": (1.2, 3.0), "depth": (0.03, 0.10)},
    "far": {"distance_mm": (3.5, 10.0), "depth": (0.015, 0.05)},
}
_LABEL_THRESHOLD = 0.01  # |1 - gain| above which a pixel belongs to a dust object
# Independent random streams, so that e.g. changing n_dust leaves the Sun unchanged.
_STREAM_SHIFTS, _STREAM_DISK, _STREAM_DUST, _STREAM_FEATURES, _STREAM_TEXTURE, _STREAM_NOISE = range(6)


# --------------------------------------------------------------------------- configuration
@dataclass
class SimConfig:
    """Everything that defines a simulated video (with ``seed``, it is fully reproducible).

    Attributes
    ----------
    height, width : int
        Frame size in pixels.
    n_frames : int
        Number of frames.
    seed : int
        Non-negative random seed.
    f_ratio : float
        Focal ratio of the light cone at the sensor (sets the dust footprint size).
    pixel_size_um : float
        Pixel pitch in micrometres.
    central_obstruction : float
        Diameter ratio of the central obstruction, 0 (refractor) to 0.9; > 0
        turns the footprint into an annulus, so far dust casts donuts.
    n_dust : int
        Number of dust particles: about 36 % near (0.15-1 mm from the sensor:
        small, 12-60 % deep), 40 % medium (1.2-3 mm: 3-10 % deep) and 24 % far
        (3.5-10 mm: 1.5-5 % deep, large rings). Footprints are kept within
        0.3 x the smaller frame side (at most 120 px); the recorded
        ``distance_mm`` is the one that gives the footprint used.
    n_sunspots, n_pores : int
        Dark solar features (they move with the Sun, they are not dust).
    drift_px : float
        Total linear drift of the Sun over the video, pixels.
    jitter_px : float
        Seeing jitter: rms per axis of the random per-frame displacement, pixels
        (re-centred so that the mean Sun position is exactly the zero shift).
    seeing_blur_px : float
        Typical Gaussian seeing blur sigma, pixels (varies about 25 % frame to
        frame, within 0.6-1.7 times this value).
    signal_adu : float
        Mean level of the solar disk in ADU (before dust and noise).
    photons_per_adu : float
        Photons (electrons) per ADU, for shot noise; ``math.inf`` gives no shot noise.
    read_noise_adu : float
        Gaussian read noise rms, ADU.
    limb : bool
        Include the solar limb and the sky beyond it (about a quarter of the field).
    texture : str
        ``"halpha"``, ``"white_light"`` or ``"cak"``.
    dust : bool
        False: no dust at all (the true flat is exactly 1.0).
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
        """Raise ``ValueError`` naming the first out-of-range field."""
        checks = [
            (self.height >= 16 and self.width >= 16, "height and width must be >= 16"),
            (self.n_frames >= 1, "n_frames must be >= 1"),
            (self.seed >= 0, "seed must be >= 0"),
            (self.f_ratio > 0 and self.pixel_size_um > 0, "f_ratio and pixel_size_um must be > 0"),
            (0.0 <= self.central_obstruction <= 0.9, "central_obstruction must be in [0, 0.9]"),
            (min(self.n_dust, self.n_sunspots, self.n_pores) >= 0, "feature counts must be >= 0"),
            (min(self.drift_px, self.jitter_px, self.seeing_blur_px) >= 0,
             "drift_px, jitter_px and seeing_blur_px must be >= 0"),
            (0 < self.signal_adu < 1e6, "signal_adu must be in (0, 1e6)"),
            (self.photons_per_adu > 0, "photons_per_adu must be > 0 (math.inf: no shot noise)"),
            (self.read_noise_adu >= 0, "read_noise_adu must be >= 0"),
            (self.texture in TEXTURES, f"texture must be one of {', '.join(TEXTURES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SimConfig: {message}")


@dataclass(eq=False)
class Scene:
    """A simulated scene: the ground truth, plus what :func:`render_frame` needs.

    Attributes
    ----------
    config : SimConfig
    true_flat : ndarray, float32 (H, W)
        Dust attenuation fixed to the sensor; 1.0 = no attenuation (exactly 1.0
        away from dust), < 1 in shadows, slightly > 1 on diffraction rims.
    dust_labels : ndarray, int32 (H, W)
        ``k > 0`` where dust object ``k`` changes the flat by more than 1 %
        (``|1 - gain_k| > 0.01``, rims included); where two overlap, the stronger.
    dust_objects : list of dict
        Per object: ``label``, ``kind`` (near/medium/far), ``y``, ``x`` (centre,
        sensor px), ``distance_mm``, ``footprint_px`` (pupil footprint diameter),
        ``particle_px`` (equivalent diameter), ``depth`` (``1 - min gain``),
        ``rim`` (``max gain - 1``: the bright rim's excess, 0.005-0.03), ``donut``, ``bbox`` (``[y0, y1, x0, x1]``,
        where the flat differs from 1), ``area_px``, ``overlaps_dust`` (labels),
        ``overlaps_dark_feature``.
    dark_feature_mask : ndarray, bool (H, W)
        Sunspots and pores in sensor coordinates at the mean Sun position.
    dark_features : list of dict
        Per feature: ``kind`` (sunspot/pore), ``y``, ``x`` (mean position),
        ``diameter_px``, ``radius_px``, ``overlaps_dust`` (labels).
    shifts : ndarray, float64 (n_frames, 2)
        True ``(dy, dx)`` of the Sun in each frame, pixels; their mean is exactly
        0, so the mean Sun position is the zero shift. Read at render time.
    blur_sigmas : ndarray, float64 (n_frames,)
        Seeing blur sigma of each frame, pixels.
    sun : dict
        The solar disk at zero shift: ``disk_center_yx`` and ``disk_radius_px``
        (sensor px), ``limb`` (whether the limb crosses the field), ``texture``,
        ``limb_darkening_u``.
    sun_canvas : ndarray, float32
        The noiseless, unblurred Sun in ADU on the padded canvas: frame ``i``
        shows at ``(y, x)`` the canvas at ``(y + pad - dy_i, x + pad - dx_i)``.
    pad : int
        Canvas rows/columns before sensor row/column 0 (at zero shift).
    """

    config: SimConfig
    true_flat: np.ndarray
    dust_labels: np.ndarray
    dust_objects: list[dict]
    dark_feature_mask: np.ndarray
    shifts: np.ndarray
    blur_sigmas: np.ndarray
    dark_features: list[dict] = field(default_factory=list)
    sun: dict = field(default_factory=dict)
    sun_canvas: np.ndarray | None = field(default=None, repr=False)
    pad: int = 0
    _spectrum: np.ndarray | None = field(default=None, repr=False)  # rfft2(sun_canvas)

    @property
    def dust_mask(self) -> np.ndarray:
        """Boolean ``(H, W)``: True where a dust object changes the flat by more than 1 %."""
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


# --------------------------------------------------------------------------- helpers
def _rng(seed: int, stream: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *more])


def _coverage(inside: Callable[[np.ndarray, np.ndarray], np.ndarray], shape: tuple[int, int],
              centre: tuple[float, float], ss: int = 4) -> np.ndarray:
    """Anti-aliased area fraction of each pixel that lies inside a shape.

    ``inside(dy, dx)`` is evaluated on ``ss x ss`` sub-pixel samples per pixel,
    ``dy, dx`` relative to ``centre`` (pixel centres are at integer coordinates).
    """
    offsets = (np.arange(ss) + 0.5) / ss - 0.5
    ys = (np.arange(shape[0])[:, None] + offsets[None, :]).ravel() - centre[0]
    xs = (np.arange(shape[1])[:, None] + offsets[None, :]).ravel() - centre[1]
    samples = inside(ys[:, None], xs[None, :]).astype(np.float64)
    return samples.reshape(shape[0], ss, shape[1], ss).mean(axis=(1, 3))


def _radial_harmonics(rng: np.random.Generator, orders: range, amplitude: float) -> list[tuple[int, float, float]]:
    return [(k, float(rng.uniform(0, amplitude)), float(rng.uniform(0, 2 * np.pi))) for k in orders]


def _modulate(theta: np.ndarray, harmonics: list[tuple[int, float, float]]) -> np.ndarray:
    out = np.ones_like(theta)
    for k, a, phase in harmonics:
        out += a * np.cos(k * theta + phase)
    return out


def _box_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    dy = min(a[1], b[1]) - max(a[0], b[0])
    dx = min(a[3], b[3]) - max(a[2], b[2])
    return max(dy, 0) * max(dx, 0)


# --------------------------------------------------------------------------- motion
def _make_motion(cfg: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame Sun shifts (linear drift + white jitter, mean exactly 0) and seeing blur sigmas."""
    rng = _rng(cfg.seed, _STREAM_SHIFTS)
    n = cfg.n_frames
    angle = rng.uniform(0, 2 * np.pi)
    t = np.arange(n) / (n - 1) - 0.5 if n > 1 else np.zeros(1)
    drift = cfg.drift_px * t[:, None] * np.array([np.sin(angle), np.cos(angle)])[None, :]
    jitter = rng.standard_normal((n, 2)) * cfg.jitter_px
    jitter -= jitter.mean(axis=0)  # the mean Sun position is exactly zero shift
    blur = cfg.seeing_blur_px * np.clip(np.exp(0.25 * rng.standard_normal(n)), 0.6, 1.7)
    return drift + jitter, blur


# --------------------------------------------------------------------------- the disk
def _make_disk(cfg: SimConfig) -> dict:
    """Disk centre (sensor px, mean position) and radius; the limb crosses the field if asked."""
    rng = _rng(cfg.seed, _STREAM_DISK)
    size = max(cfg.height, cfg.width)
    phi = rng.uniform(0, 2 * np.pi)
    u = np.array([np.sin(phi), np.cos(phi)])  # outward direction, (y, x)
    centre = np.array([(cfg.height - 1) / 2, (cfg.width - 1) / 2])
    if cfg.limb:
        radius = 3.0 * size
        extent = abs(cfg.height * u[0]) + abs(cfg.width * u[1])
        disk_centre = centre + (0.25 * extent - radius) * u  # limb a quarter extent past the centre
    else:
        radius = 4.0 * size
        disk_centre = centre - rng.uniform(0.3, 0.65) * radius * u
    return {"y": float(disk_centre[0]), "x": float(disk_centre[1]), "radius": float(radius)}


def _large_scale(cfg: SimConfig, disk: dict, shape: tuple[int, int], offset: tuple[float, float]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Limb darkening, disk indicator and sky on a grid whose (0, 0) is sensor ``-offset``.

    Returns ``(limb_darkening, edge, sky)``, float64 ``shape``; ``edge`` is the
    anti-aliased disk indicator (1 inside, 0 in the sky).
    """
    y = np.arange(shape[0]) - offset[0] - disk["y"]
    x = np.arange(shape[1]) - offset[1] - disk["x"]
    r = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
    radius = disk["radius"]
    mu = np.sqrt(np.clip(1.0 - (r / radius) ** 2, 0.0, 1.0))
    ld = 1.0 - _LIMB_U[cfg.texture] * (1.0 - mu)
    edge = 0.5 * (1.0 + special.erf((radius - r) / (np.sqrt(2.0) * 0.5)))
    if cfg.limb:
        sky = 0.02 * (0.3 + 0.7 * np.exp(-np.maximum(r - radius, 0.0) / (0.05 * radius)))
    else:
        sky = np.zeros(shape)
    return ld, edge, sky


def _inside_disk(disk: dict, y: float, x: float, margin: float) -> bool:
    return math.hypot(y - disk["y"], x - disk["x"]) < disk["radius"] - margin


# --------------------------------------------------------------------------- dust
def _dust_kinds(n: int) -> list[str]:
    n_far = max(round(0.24 * n), 1 if n >= 3 else 0)
    n_near = max(round(0.36 * n), 1 if n >= 1 else 0)
    n_medium = max(n - n_far - n_near, 0)
    return ["far"] * n_far + ["medium"] * n_medium + ["near"] * n_near  # largest placed first


def _render_dust(cfg: SimConfig, kind: str, rng: np.random.Generator) -> dict:
    """Draw one particle and render its gain patch (1.0 = no attenuation), centred in the patch."""
    cls = _DUST_CLASSES[kind]
    px_per_mm = 1000.0 / (cfg.f_ratio * cfg.pixel_size_um)  # footprint diameter per mm of distance
    max_footprint = max(8.0, min(120.0, 0.3 * min(cfg.height, cfg.width)))
    distance = rng.uniform(*cls["distance_mm"])
    footprint = float(np.clip(distance * px_per_mm, 1.5, max_footprint))
    distance = footprint / px_per_mm
    c = cfg.central_obstruction
    target = rng.uniform(*cls["depth"])
    cap = rng.uniform(0.40, 0.60) if kind == "near" else 1.0
    particle = max(0.8, footprint * math.sqrt(target * (1.0 - c * c)))  # equivalent diameter, px
    axis_ratio = rng.uniform(0.55, 1.0)
    tilt = rng.uniform(0, np.pi)
    harmonics = _radial_harmonics(rng, range(2, 6), 0.08)
    semi_major = particle / 2 / math.sqrt(axis_ratio)
    sigma_rim = 0.5 + 0.04 * footprint
    half = int(math.ceil(semi_major * 1.35 + footprint / 2 + 3 * sigma_rim + 3))
    sub = rng.uniform(-0.5, 0.5, size=2)  # sub-pixel position of the centre
    size = 2 * half + 1
    centre = (half + sub[0], half + sub[1])

    def silhouette(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        theta = np.arctan2(dy, dx)
        along = dx * np.cos(tilt) + dy * np.sin(tilt)
        across = -dx * np.sin(tilt) + dy * np.cos(tilt)
        rho = np.sqrt((along / semi_major) ** 2 + (across / (semi_major * axis_ratio)) ** 2)
        return rho <= _modulate(theta, harmonics)

    sil = _coverage(silhouette, (size, size), centre, ss=4)
    k_half = int(math.ceil(footprint / 2 + 1))
    ss = 8 if footprint < 16 else 4

    def pupil(inner: float) -> np.ndarray:
        def inside(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
            r = np.hypot(dy, dx)
            return (r <= footprint / 2) & (r >= inner * footprint / 2)
        kern = _coverage(inside, (2 * k_half + 1, 2 * k_half + 1), (k_half, k_half), ss=ss)
        return kern / kern.sum()

    from scipy.signal import fftconvolve

    shadow = np.clip(fftconvolve(sil, pupil(c), mode="same"), 0.0, 1.0)
    peak = shadow.max()
    if peak > cap:  # a particle is never perfectly opaque: near shadows saturate at 40-60 %
        shadow *= cap / peak
    envelope = np.clip(fftconvolve(sil, pupil(0.0), mode="same"), 0.0, None)
    envelope /= max(envelope.max(), 1e-12)
    spread = ndimage.gaussian_filter(envelope, sigma_rim, mode="constant", truncate=3.0)  # compact support
    rim_shape = np.clip(spread - envelope, 0.0, None)
    rim_shape /= max(rim_shape.max(), 1e-12)
    depth = float(shadow.max())
    rim_amp = min(rng.uniform(0.01, 0.03), 0.3 * depth + 0.005)  # faint shadows, fainter rims
    gain = 1.0 - shadow + rim_amp * rim_shape
    gain[np.abs(gain - 1.0) < 1e-6] = 1.0
    cy, cx = int(round(centre[0])), int(round(centre[1]))
    donut = bool(c > 0 and 1.0 - gain[cy, cx] < 0.7 * (1.0 - gain.min()))
    return {
        "kind": kind, "gain": gain, "half": half, "sub": sub, "distance_mm": distance,
        "footprint_px": footprint, "particle_px": particle, "donut": donut,
    }


def _make_dust(cfg: SimConfig, disk: dict) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Render and place the dust: returns ``(true_flat, labels, objects)``."""
    h, w = cfg.height, cfg.width
    flat = np.ones((h, w), dtype=np.float64)
    labels = np.zeros((h, w), dtype=np.int32)
    if not cfg.dust or cfg.n_dust == 0:
        return flat.astype(np.float32), labels, []
    strength = np.zeros((h, w), dtype=np.float64)
    objects: list[dict] = []
    placed: list[tuple[int, int, int, int]] = []
    extents: list[tuple[tuple[slice, slice], np.ndarray]] = []
    for label, kind in enumerate(_dust_kinds(cfg.n_dust), start=1):
        rng = _rng(cfg.seed, _STREAM_DUST, label)  # one stream per object: placement stays local
        d = _render_dust(cfg, kind, rng)
        gain, half = d["gain"], d["half"]
        rows, cols = np.nonzero(np.abs(gain - 1.0) > _LABEL_THRESHOLD)
        if rows.size == 0:
            rows, cols = np.array([half]), np.array([half])
        ext = (rows.min() - half, rows.max() - half + 1, cols.min() - half, cols.max() - half + 1)

        def conflict(yc: int, xc: int) -> float:
            box = (yc + ext[0] - 2, yc + ext[1] + 2, xc + ext[2] - 2, xc + ext[3] + 2)
            score = float(sum(_box_overlap(box, other) for other in placed))
            if cfg.limb and not _inside_disk(disk, yc, xc, margin=half + 2):
                score += 1e6
            return score

        lo_y, hi_y = -ext[0], h - ext[1]  # keep the visible shadow inside the frame if possible
        lo_x, hi_x = -ext[2], w - ext[3]
        best, best_score = None, np.inf
        for _ in range(300):
            yc = int(rng.integers(lo_y, hi_y + 1)) if hi_y >= lo_y else h // 2
            xc = int(rng.integers(lo_x, hi_x + 1)) if hi_x >= lo_x else w // 2
            score = conflict(yc, xc)
            if score < best_score:
                best, best_score = (yc, xc), score
            if score == 0:
                break
        yc, xc = best
        placed.append((yc + ext[0], yc + ext[1], xc + ext[2], xc + ext[3]))
        # paste the patch (clipped to the frame)
        y0, x0 = yc - half, xc - half
        sy = slice(max(y0, 0), min(y0 + gain.shape[0], h))
        sx = slice(max(x0, 0), min(x0 + gain.shape[1], w))
        g = gain[sy.start - y0:sy.stop - y0, sx.start - x0:sx.stop - x0]
        flat[sy, sx] *= g
        dev = np.abs(g - 1.0)
        own = dev > _LABEL_THRESHOLD
        win = own & (dev > strength[sy, sx])
        labels[sy, sx][win] = label
        strength[sy, sx][win] = dev[win]
        extents.append(((sy, sx), own))
        changed_r, changed_c = np.nonzero(g != 1.0)
        bbox = ([int(sy.start + changed_r.min()), int(sy.start + changed_r.max() + 1),
                 int(sx.start + changed_c.min()), int(sx.start + changed_c.max() + 1)]
                if changed_r.size else [int(sy.start), int(sy.start), int(sx.start), int(sx.start)])
        objects.append({
            "label": label, "kind": kind,
            "y": float(yc + d["sub"][0]), "x": float(xc + d["sub"][1]),
            "distance_mm": float(d["distance_mm"]), "footprint_px": float(d["footprint_px"]),
            "particle_px": float(d["particle_px"]),
            "depth": float(1.0 - gain.min()), "rim": float(gain.max() - 1.0),
            "donut": d["donut"], "bbox": bbox,
        })
    for obj, ((sy, sx), own) in zip(objects, extents):
        obj["area_px"] = int(np.count_nonzero(labels == obj["label"]))
        others = np.unique(labels[sy, sx][own])
        obj["overlaps_dust"] = [int(k) for k in others if k not in (0, obj["label"])]
        obj["overlaps_dark_feature"] = False
    return flat.astype(np.float32), labels, objects


# --------------------------------------------------------------------------- dark solar features
def _feature_level(feat: dict, dy: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity factor (1 = quiet Sun) and inside-mask of a feature, at offsets from its centre."""
    theta = np.arctan2(dy, dx)
    if feat["kind"] == "sunspot":
        r = np.hypot(dy, dx)
        r_out = feat["radius"] * _modulate(theta, feat["shape"])
        r_umb = feat["umbra_ratio"] * feat["radius"] * _modulate(theta, feat["umbra_shape"])
        pen = feat["penumbra"] * (1.0 + 0.07 * np.cos(feat["n_fil"] * theta + 2.0 * np.sin(3 * theta)))
        s_pen = np.clip(0.5 + (r_out - r), 0.0, 1.0)
        s_umb = np.clip(0.5 + (r_umb - r), 0.0, 1.0)
        level = 1.0 + s_pen * (pen - 1.0) + s_umb * (feat["umbra"] - pen)
        return level, r <= r_out
    a, q, t = feat["radius"], feat["axis_ratio"], feat["tilt"]
    along = dx * np.cos(t) + dy * np.sin(t)
    across = -dx * np.sin(t) + dy * np.cos(t)
    rr = np.hypot(along, across / q) * math.sqrt(q)  # equal-area elliptical radius
    level = 1.0 - feat["depth"] * np.clip(0.5 + (a - rr) / 1.2, 0.0, 1.0)
    return level, rr <= a


def _make_features(cfg: SimConfig, disk: dict, dust_mask: np.ndarray) -> list[dict]:
    """Draw sunspots and pores at the mean Sun position, away from dust where possible."""
    rng = _rng(cfg.seed, _STREAM_FEATURES)
    h, w = cfg.height, cfg.width
    dist = ndimage.distance_transform_edt(~dust_mask) if dust_mask.any() else np.full((h, w), np.inf)
    motion = cfg.drift_px / 2 + 2 * cfg.jitter_px + 2  # keep clear of dust over the whole video
    features: list[dict] = []
    max_spot = max(4.0, min(40.0, 0.25 * min(h, w)))
    for kind in ["sunspot"] * cfg.n_sunspots + ["pore"] * cfg.n_pores:
        if kind == "sunspot":
            diameter = rng.uniform(min(10.0, max_spot), max_spot)
            feat = {
                "kind": kind, "radius": diameter / 2,
                "shape": _radial_harmonics(rng, range(2, 5), 0.08),
                "umbra_shape": _radial_harmonics(rng, range(2, 4), 0.08),
                "umbra_ratio": rng.uniform(0.38, 0.48), "umbra": rng.uniform(*_UMBRA[cfg.texture]),
                "penumbra": rng.uniform(*_PENUMBRA[cfg.texture]), "n_fil": int(rng.integers(24, 48)),
            }
            reach = feat["radius"] * 1.3
        else:
            diameter = rng.uniform(3.0, 8.0)
            feat = {"kind": kind, "radius": diameter / 2, "axis_ratio": rng.uniform(0.7, 1.0),
                    "tilt": rng.uniform(0, np.pi), "depth": rng.uniform(0.45, 0.65)}
            reach = feat["radius"] * 1.25 + 1
        feat["diameter_px"] = float(diameter)
        margin = int(math.ceil(reach + 2))
        best, best_score = None, np.inf
        for _ in range(400):
            y = rng.uniform(margin, h - 1 - margin) if h - 1 > 2 * margin else (h - 1) / 2
            x = rng.uniform(margin, w - 1 - margin) if w - 1 > 2 * margin else (w - 1) / 2
            score = max(0.0, reach + motion - float(dist[int(round(y)), int(round(x))]))
            score += sum(max(0.0, reach + f["reach"] + 3 - math.hypot(y - f["y"], x - f["x"])) for f in features)
            if not _inside_disk(disk, y, x, margin=reach + motion + 2):
                score += 1e6
            if score < best_score:
                best, best_score = (y, x), score
            if score == 0:
                break
        feat["y"], feat["x"], feat["reach"] = float(best[0]), float(best[1]), float(reach)
        features.append(feat)
    return features


def _paint_features(features: list[dict], shape: tuple[int, int], offset: tuple[float, float],
                    out_level: np.ndarray | None = None, out_mask: np.ndarray | None = None) -> None:
    """Multiply feature levels into ``out_level`` and OR their masks into ``out_mask``.

    A feature at sensor ``(y, x)`` lands at grid position ``(y + offset[0], x + offset[1])``.
    """
    for feat in features:
        cy, cx = feat["y"] + offset[0], feat["x"] + offset[1]
        r = int(math.ceil(feat["reach"] + 2))
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 2, shape[0])
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 2, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        dy = (np.arange(y0, y1) - cy)[:, None]
        dx = (np.arange(x0, x1) - cx)[None, :]
        level, inside = _feature_level(feat, dy + 0 * dx, dx + 0 * dy)
        if out_level is not None:
            out_level[y0:y1, x0:x1] *= level
        if out_mask is not None:
            out_mask[y0:y1, x0:x1] |= inside


def _public_feature(feat: dict, dust_labels: np.ndarray, mask_one: np.ndarray) -> dict:
    hits = np.unique(dust_labels[mask_one])
    return {"kind": feat["kind"], "y": feat["y"], "x": feat["x"], "diameter_px": feat["diameter_px"],
            "radius_px": feat["diameter_px"] / 2, "overlaps_dust": [int(k) for k in hits if k > 0]}


# --------------------------------------------------------------------------- texture
def _freq(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    fy = sfft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = sfft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    return fy, fx


def _unit(field_: np.ndarray) -> np.ndarray:
    field_ = field_ - field_.mean()
    return field_ / max(float(field_.std()), 1e-12)


def _filtered(spec: np.ndarray, transfer: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return _unit(sfft.irfft2(spec * transfer, s=shape, workers=_WORKERS))


def _ring(f: np.ndarray, f0: float, rel_width: float) -> np.ndarray:
    return np.exp(-0.5 * ((f - f0) / (rel_width * f0)) ** 2)


def _lowpass(f: np.ndarray, sigma_px: float) -> np.ndarray:
    return np.exp(-2.0 * np.pi ** 2 * sigma_px ** 2 * f ** 2)


def _texture(cfg: SimConfig, shape: tuple[int, int]) -> np.ndarray:
    """Zero-mean relative texture (e.g. 0.05 = 5 % brighter) on the canvas, float32."""
    rng = _rng(cfg.seed, _STREAM_TEXTURE)
    fy, fx = _freq(shape)
    f = np.hypot(fy, fx)

    def noise_spec() -> np.ndarray:
        return sfft.rfft2(rng.standard_normal(shape, dtype=np.float32), workers=_WORKERS)

    if cfg.texture == "white_light":  # granulation: bright cells, narrow dark lanes
        n = _filtered(noise_spec(), _ring(f, 1 / 5.5, 0.35), shape)
        tex = 0.035 * _unit(n - 0.25 * (n * n - 1.0))
    elif cfg.texture == "cak":  # chromospheric network, bright grains, plage
        n = _filtered(noise_spec(), _ring(f, 1 / 45, 0.6), shape)
        patches = _filtered(noise_spec(), _ring(f, 1 / 20, 0.6), shape)  # breaks the lanes up
        network = _unit(np.exp(-(n / 0.45) ** 2) * np.clip(0.5 + 0.5 * patches, 0.0, 1.0))
        grains = _filtered(noise_spec(), _ring(f, 1 / 4, 0.4), shape)
        plage = _filtered(noise_spec(), _lowpass(f, 50.0), shape)
        tex = 0.10 * network + 0.03 * grains + 0.15 * np.clip(plage - 0.8, 0.0, None)
    else:  # halpha: fibrils whose orientation varies smoothly, mottles, bright plage
        spec = noise_spec()
        angle = 1.2 * _filtered(noise_spec(), _lowpass(f, 100.0), shape)
        fib = np.zeros(shape, dtype=np.float32)
        norm = np.zeros(shape, dtype=np.float32)
        ring = _ring(f, 1 / 7, 0.5)
        for k in range(6):
            t = k * np.pi / 6
            f_par = fx * np.float32(np.cos(t)) + fy * np.float32(np.sin(t))  # along the fibril
            part = _filtered(spec, ring * np.exp(-0.5 * (f_par / 0.03) ** 2), shape)
            wk = np.cos(angle - t) ** 8
            fib += wk * part
            norm += wk * wk
        fib = _unit(fib / np.sqrt(norm + 1e-6))
        mottles = _filtered(noise_spec(), _ring(f, 1 / 25, 0.5), shape)
        plage = _filtered(noise_spec(), _lowpass(f, 40.0), shape)
        # filament channels: dark lanes along the zero crossings of a large-scale field, in segments
        lanes = np.exp(-((_filtered(noise_spec(), _lowpass(f, 50.0), shape) / 0.2) ** 2))
        segments = np.clip(_filtered(noise_spec(), _lowpass(f, 35.0), shape) - 0.5, 0.0, 1.0)
        tex = (0.05 * fib + 0.03 * mottles + 0.12 * np.clip(plage - 0.8, 0.0, None)
               - 0.15 * lanes * segments)
    tex = tex - tex.mean()
    return tex.astype(np.float32)


# --------------------------------------------------------------------------- scene
def make_scene(config: SimConfig) -> Scene:
    """Build the ground truth and the Sun's spectrum for *config* (deterministic).

    Cost: a few FFTs of the canvas (about the frame size plus the motion
    margin); well under a second at 640 x 480, a few seconds at 1920 x 1200.
    """
    cfg = config
    cfg.validate()
    h, w = cfg.height, cfg.width
    shifts, blur = _make_motion(cfg)  # mean exactly 0: the mean position is the zero shift
    disk = _make_disk(cfg)
    true_flat, labels, objects = _make_dust(cfg, disk)
    features = _make_features(cfg, disk, labels > 0)

    # truth: dark features at the mean position, and who overlaps whom
    dark = np.zeros((h, w), dtype=bool)
    public_features = []
    for feat in features:
        one = np.zeros((h, w), dtype=bool)
        _paint_features([feat], (h, w), (0.0, 0.0), out_mask=one)
        dark |= one
        public_features.append(_public_feature(feat, labels, one))
    hit = set(np.unique(labels[dark]).tolist()) - {0}
    for obj in objects:
        obj["overlaps_dark_feature"] = obj["label"] in hit

    # the canvas: frame + largest shift + blur + taper, FFT-friendly
    need = int(math.ceil(np.abs(shifts).max() + 4 * blur.max() + 6))
    taper = 24
    pad = need + taper
    shape = (sfft.next_fast_len(h + 2 * pad, real=True), sfft.next_fast_len(w + 2 * pad, real=True))
    to_canvas = (float(pad), float(pad))  # sensor (zero shift) -> canvas
    level = np.ones(shape, dtype=np.float64)
    _paint_features(features, shape, to_canvas, out_level=level)
    ld, edge, sky = _large_scale(cfg, disk, shape, to_canvas)
    tex = _texture(cfg, shape)
    sun = edge * ld * np.clip(level * (1.0 + tex * level), 0.05, None) + sky

    # normalise: mean of the disk in the field at the mean position = signal_adu
    crop, on_disk = sun[pad:pad + h, pad:pad + w], edge[pad:pad + h, pad:pad + w] > 0.5
    sun *= cfg.signal_adu / float(crop[on_disk].mean() if on_disk.any() else crop.mean())

    # taper the outer margin to a constant so the canvas is periodic (no FFT wrap ringing)
    fill = float(sun.mean())
    win = np.outer(_taper(shape[0], taper), _taper(shape[1], taper))
    canvas = (win * sun + (1.0 - win) * fill).astype(np.float32)
    sun_info = {"disk_center_yx": [disk["y"], disk["x"]], "disk_radius_px": disk["radius"],
                "limb": cfg.limb, "texture": cfg.texture, "limb_darkening_u": _LIMB_U[cfg.texture]}
    return Scene(
        config=cfg, true_flat=true_flat, dust_labels=labels, dust_objects=objects,
        dark_feature_mask=dark, shifts=shifts, blur_sigmas=blur, dark_features=public_features,
        sun=sun_info, sun_canvas=canvas, pad=pad, _spectrum=sfft.rfft2(canvas, workers=_WORKERS),
    )


def _taper(n: int, width: int) -> np.ndarray:
    """1 in the middle, raised-cosine to 0 over *width* samples at both ends."""
    out = np.ones(n)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(width) + 0.5) / width)
    out[:width] = ramp
    out[n - width:] = ramp[::-1]
    return out


# --------------------------------------------------------------------------- frames
def _check_index(scene: Scene, index: int) -> int:
    n = scene.config.n_frames
    if not -n <= index < n:
        raise IndexError(f"frame index {index} out of range for {n} frames")
    return index % n


def clean_sun(scene: Scene, index: int) -> np.ndarray:
    """Noiseless Sun of frame *index*, without dust: float32 ``(H, W)`` in ADU.

    The canvas spectrum times a phase ramp (the shift) and a Gaussian transfer
    function (the seeing blur), inverse-transformed only on the rows that are
    cropped to the sensor.
    """
    index = _check_index(scene, index)
    cfg = scene.config
    dy, dx = (float(v) for v in scene.shifts[index])
    sigma = float(scene.blur_sigmas[index])
    hc, wc = scene.sun_canvas.shape
    oy = ox = scene.pad
    fy = sfft.fftfreq(hc)
    fx = sfft.rfftfreq(wc)
    k = -2.0 * np.pi ** 2 * sigma ** 2
    ay = np.exp(-2j * np.pi * fy * dy + k * fy ** 2).astype(np.complex64)
    ax = np.exp(-2j * np.pi * fx * dx + k * fx ** 2).astype(np.complex64)
    cols = sfft.ifft(scene._spectrum * ay[:, None], axis=0, overwrite_x=True, workers=_WORKERS)
    rows = cols[oy:oy + cfg.height]
    rows *= ax[None, :]
    sun = sfft.irfft(rows, n=wc, axis=1, workers=_WORKERS)[:, ox:ox + cfg.width]
    return np.ascontiguousarray(sun, dtype=np.float32)


def expected_frame(scene: Scene, index: int) -> np.ndarray:
    """Noiseless frame *index* with its dust, ``clean_sun x true_flat``: float32 ADU, not clipped."""
    out = clean_sun(scene, index)
    out *= scene.true_flat
    return out


def render_frame(scene: Scene, index: int) -> np.ndarray:
    """Frame *index* as the camera records it: uint16 ``(H, W)``.

    ``clean_sun x true_flat``, plus shot noise and read noise, rounded and
    clipped to ``[0, 65535]``. Deterministic given ``(config, index)``.
    """
    index = _check_index(scene, index)
    cfg = scene.config
    signal = expected_frame(scene, index)
    np.maximum(signal, 0.0, out=signal)
    rng = _rng(cfg.seed, _STREAM_NOISE, index)
    z = rng.standard_normal(signal.shape, dtype=np.float32)
    ppa = float(cfg.photons_per_adu)
    read2 = np.float32(cfg.read_noise_adu ** 2)
    if math.isfinite(ppa):
        sd = np.sqrt(signal * np.float32(1.0 / ppa) + read2)
        photons = signal * np.float32(ppa)
        low = photons < _POISSON_BELOW
        frame = signal + sd * z
        if low.any():  # the Gaussian approximation is poor at a few photons: draw them exactly
            frame[low] = (rng.poisson(photons[low]) / ppa + cfg.read_noise_adu * z[low]).astype(np.float32)
    else:
        frame = signal + np.float32(cfg.read_noise_adu) * z
    np.clip(frame, 0.0, 65535.0, out=frame)
    np.rint(frame, out=frame)
    return frame.astype(np.uint16)


def iter_frames(scene: Scene, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    """Yield the uint16 frames ``start .. stop - 1`` (default: all) one at a time."""
    stop = scene.config.n_frames if stop is None else min(stop, scene.config.n_frames)
    for i in range(start, stop):
        yield render_frame(scene, i)


# --------------------------------------------------------------------------- files
def _ser_ticks(index: int) -> int:
    """SER timestamp: 100 ns ticks since 0001-01-01 (UTC) of frame *index*."""
    delta = _START_TIME - _dt.datetime(1, 1, 1)
    base = (delta.days * 86400 + delta.seconds) * 10_000_000
    return base + int(round(index * 1e7 / FRAME_RATE_HZ))


def _truth(scene: Scene) -> dict[str, Any]:
    import scipy

    from . import __version__

    return {
        "simulator": "aiflat_local.synth", "sim_version": SIM_VERSION,
        "config": asdict(scene.config),
        "conventions": {
            "flat": "1.0 = no attenuation; true_flat.fits is float32",
            "shifts": "(dy, dx) px: frame i at (y, x) shows the zero-shift Sun at (y - dy, x - dx)",
            "dust_labels": "k > 0 where dust object k changes the flat by more than 1 %",
            "dark_features": "sunspots and pores at the mean Sun position",
            "rows": "row 0 = first SER row (FITS files are stored bottom-up with ROWORDER)",
        },
        "objects": scene.dust_objects,
        "dark_features": scene.dark_features,
        "sun": scene.sun,
        "shifts": [[float(a), float(b)] for a, b in scene.shifts],
        "blur_sigmas": [float(s) for s in scene.blur_sigmas],
        "frame_rate_hz": FRAME_RATE_HZ,
        "counts": {
            "dust_objects": len(scene.dust_objects),
            "dust_pixels": int(np.count_nonzero(scene.dust_labels)),
            "dark_feature_pixels": int(np.count_nonzero(scene.dark_feature_mask)),
        },
        "versions": {"aiflat_local": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
                     "python": platform.python_version()},
    }


def simulate(out_dir: str | os.PathLike, config: SimConfig | None = None, progress: bool = False) -> SimPaths:
    """Simulate a dusty video and write it with its ground truth into *out_dir*.

    Writes ``video.ser`` (16-bit mono, frames streamed one at a time, with
    timestamps), ``true_flat.fits`` (float32, 1.0 = no attenuation),
    ``dust_mask.png`` (255 = dust), ``dust_labels.fits`` (int32),
    ``dark_features.png`` (255 = sunspot/pore at the mean position) and
    ``truth.json`` (config, dust objects, dark features, shifts, versions).
    Every file appears only when complete.
    """
    from tqdm.auto import tqdm

    from .io import write_fits, write_mask
    from .io._atomic import check_writable_dir
    from .io.ser import SerHeader, SerWriter

    cfg = config or SimConfig()
    directory = Path(out_dir)
    check_writable_dir(directory)
    scene = make_scene(cfg)
    paths = SimPaths(
        directory=directory, video=directory / "video.ser", true_flat=directory / "true_flat.fits",
        dust_mask=directory / "dust_mask.png", dust_labels=directory / "dust_labels.fits",
        dark_features=directory / "dark_features.png", truth=directory / "truth.json",
    )
    start = _ser_ticks(0)
    header = SerHeader(0, 0, cfg.width, cfg.height, 16, 0, observer="aiflat-local simulator",
                       instrument=f"synth v{SIM_VERSION} seed {cfg.seed}",
                       telescope=f"f/{cfg.f_ratio:g}", date_time=start, date_time_utc=start)
    stamps = [_ser_ticks(i) for i in range(cfg.n_frames)]
    with SerWriter(paths.video, width=cfg.width, height=cfg.height, dtype=np.uint16, like=header,
                   timestamps=stamps) as writer:
        for frame in tqdm(iter_frames(scene), total=cfg.n_frames, disable=not progress,
                          desc="simulating", unit="frame"):
            writer.write(frame)
    provenance = {"CREATOR": "aiflat-local synth", "SIMVER": SIM_VERSION, "SIMSEED": cfg.seed}
    write_fits(paths.true_flat, scene.true_flat, {**provenance, "CONTENT": "true flat, 1.0 = no attenuation"})
    write_fits(paths.dust_labels, scene.dust_labels, {**provenance, "CONTENT": "dust labels, 0 = clean"})
    write_mask(paths.dust_mask, scene.dust_mask)
    write_mask(paths.dark_features, scene.dark_feature_mask)
    from .io import atomic_path

    with atomic_path(paths.truth) as tmp:
        tmp.write_text(json.dumps(_truth(scene), indent=1))
    return paths

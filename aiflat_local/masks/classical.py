"""The classical dust masker: deterministic, no weights, a few seconds per image.

What it looks for
-----------------
In a temporal median of a solar video, a dust shadow is a *multiplicative*
dip fixed to the sensor: dark, compact, round or donut-shaped, from ~3 px to
~100+ px across, 1.5 % to ~60 % deep (more for big particles right on the
sensor window), often with a faint bright rim. The physics ties depth to
size: a particle ``p`` px across whose beam footprint is ``f`` px
(``f = distance / f-ratio``) casts a shadow about ``f + p`` across and
``(p / f)**2`` deep, so big shadows are faint and deep shadows are small (see
:func:`plausible_depth`). Solar structure in the median is smooth-ish but has
dark features that are *not* dust: sunspots, pores, filaments, dark texture,
and the limb and sky.

How
---
1. **Disk**: large regions darker than ``sky_fraction`` of the disk level are
   sky; they are replaced by the nearest disk value before any filtering (so
   the limb does not bias the background) and objects on the sky or within
   ``limb_margin_px`` of it are rejected.
2. **Multi-scale deficit**: for each Gaussian scale ``s`` in ``scales_px``
   the image smoothed by ``s`` is compared with a median background over
   ``background_factor * s`` px, computed on a block-reduced image (a blob
   much smaller than the window does not pull it down, at every size, and the
   cost stays low): ``deficit_s = 1 - smooth_s / background_s``. Each map is
   divided by its own robust local noise (1.4826 x MAD in tiles), which
   includes the solar texture at that scale.
3. **Hysteresis**: seeds where some scale is ``seed_sigma`` significant and
   ``min_seed_depth`` deep, grown over ``grow_sigma``.
4. **Refinement**: the background inside each candidate (dilated) is
   re-estimated by a harmonic fill from the pixels around it (works for blobs
   of any size); an object is the connected set of pixels significant against
   it, no shallower than ``rel_floor`` of its own peak, holes (donut centres)
   filled. Touching shadows are split, one object per core (the part deeper
   than a quarter of the peak).
5. **Rejection** of what is not dust: sky/limb, too large, elongated (solar
   filaments; a deep fibre shorter than ``max_fibre_length_px`` is kept), too
   deep for its size (sunspot umbrae, :func:`plausible_depth`), a deep core in
   a wide shallow skirt (umbra + penumbra), ragged faint patches (solar
   structure), and tiny faint specks (noise, granulation).
6. **Motion** (only with ``frames`` that move by ``motion_min_px`` rms or
   more): each frame is registered on the reference, and every object is
   tested for whether it moves with the Sun (:func:`_sun_coupling`). Pores,
   small sunspots and dark texture look exactly like dust in one image; this
   is what tells them apart, and it lets the detector seed at the lower
   ``seed_sigma_frames``. The frames also give a map of what is fixed on the
   sensor with the solar texture cancelled, which adds faint shadows hidden
   in strong texture (see :meth:`ClassicalMasker._add_sensor_fixed`).

Without frames (a single image) pores cannot be told from dust: they stay in
the mask. The mask is the detection itself, not expanded: expansion and
feathering belong to :mod:`aiflat_local.flat`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ..inpaint.harmonic import HarmonicInpainter
from .base import MASKERS, MaskResult, prepare_reference

_EIGHT = np.ones((3, 3), dtype=bool)
_MAD = 1.4826


# --------------------------------------------------------------------------- small tools
def _odd(n: float) -> int:
    k = max(int(round(n)), 1)
    return k if k % 2 else k + 1


def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f x f`` blocks (edge-padded to a multiple of *f*)."""
    if f <= 1:
        return img
    h, w = img.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    a = img if (hp, wp) == (h, w) else np.pad(img, ((0, hp - h), (0, wp - w)), mode="edge")
    a = a.astype(np.float32, copy=False).reshape(hp // f, f, wp // f, f)
    return a.sum(axis=3).sum(axis=1) * np.float32(1.0 / (f * f))


def _upsample(coarse: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a block-reduced image back to *shape* (pixel-centre aligned)."""
    if f <= 1:
        return coarse[: shape[0], : shape[1]]
    ch, cw = coarse.shape
    ys = (np.arange(shape[0]) + 0.5) / f - 0.5
    xs = (np.arange(shape[1]) + 0.5) / f - 0.5

    def axis_weights(t, n):
        t = np.clip(t, 0, n - 1)
        i0 = np.floor(t).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        return i0, i1, (t - i0).astype(np.float32)

    y0, y1, wy = axis_weights(ys, ch)
    x0, x1, wx = axis_weights(xs, cw)
    rows = coarse[y0] * (1 - wy)[:, None] + coarse[y1] * wy[:, None]
    return (rows[:, x0] * (1 - wx)[None, :] + rows[:, x1] * wx[None, :]).astype(np.float32)


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing; from sigma 4 px on, computed on a block-reduced image (cheap)."""
    if sigma < 4:
        return ndimage.gaussian_filter(img, sigma)
    f = int(sigma // 2)
    coarse = ndimage.gaussian_filter(_block_mean(img, f), sigma / f)
    return _upsample(coarse, f, img.shape)


def _label_max(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Per-label maximum of *values* (index 0 unused), by label bounding boxes (fast)."""
    out = np.zeros(n + 1, np.float32)
    for i, sl in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        if sl is not None:
            out[i] = values[sl][labels[sl] == i].max()
    return out


def _label_argmax(values: np.ndarray, labels: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Per-label position of the maximum of *values* (labels 1..n)."""
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        v = np.where(labels[sl] == i, values[sl], -np.inf)
        y, x = np.unravel_index(int(np.argmax(v)), v.shape)
        out.append((y + sl[0].start, x + sl[1].start))
    return out


def _nearest_label(labels: np.ndarray, within: np.ndarray) -> np.ndarray:
    """For each pixel of *within*, the label of the nearest labelled pixel (0 elsewhere).

    Computed per connected part of *within*, on its bounding box only.
    """
    out = np.zeros_like(labels)
    comp, _ = ndimage.label(within, structure=_EIGHT)
    for i, sl in enumerate(ndimage.find_objects(comp), start=1):
        if sl is None:
            continue
        lab = labels[sl]
        if not lab.any():
            continue
        idx = ndimage.distance_transform_edt(lab == 0, return_distances=False, return_indices=True)
        sel = comp[sl] == i
        out[sl][sel] = lab[idx[0], idx[1]][sel]
    return out


def _local_sigma(d: np.ndarray, tile: int, floor: float) -> np.ndarray:
    """Robust local noise (1.4826 x MAD) of *d* in ``tile x tile`` tiles, smoothed, upsampled."""
    h, w = d.shape
    tile = max(8, min(tile, max(h, w)))
    th, tw = -(-h // tile), -(-w // tile)
    a = np.pad(d, ((0, th * tile - h), (0, tw * tile - w)), mode="reflect")
    step = 2 if tile >= 32 else 1  # every other pixel each way: plenty for a robust scale
    blocks = a.reshape(th, tile, tw, tile)[:, ::step, :, ::step]
    blocks = blocks.transpose(0, 2, 1, 3).reshape(th, tw, -1)
    med = np.median(blocks, axis=2)
    mad = np.median(np.abs(blocks - med[..., None]), axis=2) * _MAD
    if min(th, tw) >= 3:
        mad = ndimage.median_filter(mad, size=3, mode="nearest")
    return np.maximum(_upsample(mad.astype(np.float32), tile, (h, w)), floor)


def _moments(ys: np.ndarray, xs: np.ndarray) -> tuple[float, float, float]:
    """Centroid-free shape of a pixel set: (major length, minor length, elongation)."""
    if ys.size < 3:
        return float(ys.size), float(ys.size), 1.0
    cov = np.cov(np.vstack([ys, xs]).astype(np.float64)) + np.eye(2) / 12.0
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    major, minor = 4 * math.sqrt(max(ev[0], 1e-12)), 4 * math.sqrt(max(ev[1], 1e-12))
    return major, minor, major / minor


def plausible_depth(diameter_px: float, max_particle_px: float, max_depth: float) -> float:
    """Deepest plausible dust shadow of a given outer diameter.

    A particle ``p`` px across whose beam footprint is ``f`` px casts a shadow
    ``D = f + p`` across and ``(p / f)**2`` deep (for ``p < f``). For a given
    ``D`` the depth grows with ``p``, so with particles at most
    ``max_particle_px`` across: ``depth <= (p / (D - p))**2``, and never more
    than *max_depth*.
    """
    p = float(max_particle_px)
    if diameter_px <= 2 * p:
        return float(max_depth)
    return float(min(max_depth, (p / (diameter_px - p)) ** 2))


# --------------------------------------------------------------------------- the masker
@MASKERS.register("classical",
                  "multi-scale deficit detector with physical and motion checks (no weights)")
@dataclass
class ClassicalMasker:
    """Deterministic dust masker (see the module documentation for the method).

    All parameters are keyword arguments with the defaults below; every one is
    recorded in ``MaskResult.params``. Depths are fractions (0.1 = 10 %),
    sizes in pixels.

    Parameters
    ----------
    scales_px : tuple of float
        Gaussian smoothing scales of the multi-scale detection; a scale ``s``
        is most sensitive to shadows about ``3 s`` across.
    background_factor : float
        Background median window = ``background_factor * s`` at scale ``s``.
    seed_sigma : float
        Seed threshold, in units of the local noise at each scale (single image,
        or frames without usable motion).
    seed_sigma_frames : float
        Seed threshold when the motion check runs (it removes the extra
        false detections a lower threshold lets in).
    grow_sigma : float
        Hysteresis growth threshold (local noise units).
    min_seed_depth : float
        A seed must also be at least this deep.
    pixel_sigma : float
        Refinement threshold (local noise units) against the harmonic background.
    min_pixel_depth, rel_floor : float
        And every object pixel at least this deep, and at least ``rel_floor``
        of its object's peak (stops a deep shadow growing into the texture).
    min_area_px : int
        Smaller objects are dropped.
    speck_diameter_px, speck_min_depth : float
        Objects smaller than ``speck_diameter_px`` and shallower than
        ``speck_min_depth`` are dropped: a shadow that small comes from dust
        close to the sensor, which is deep; a tiny faint dip is noise.
    max_diameter_px : float
        Objects with a larger equivalent diameter are not dust.
    max_elongation, fibre_min_depth, max_fibre_length_px : float
        Objects whose core is more elongated than ``max_elongation`` (major /
        minor axis) are filaments or texture, unless at least
        ``fibre_min_depth`` deep and at most ``max_fibre_length_px`` long (a
        dust fibre).
    max_particle_px, max_dust_depth : float
        Largest particle assumed and deepest shadow allowed: an object deeper
        than :func:`plausible_depth` of its core diameter is a sunspot umbra.
    umbra_min_depth, min_core_share, umbra_max_elongation : float
        An object at least ``umbra_min_depth`` deep whose half-peak core is
        less than ``min_core_share`` of its clearly dark part (and that is
        round: elongation up to ``umbra_max_elongation``) is an umbra in its
        penumbra.
    min_solidity, min_roundness, ragged_min_diameter_px : float
        Objects shallower than ``fibre_min_depth`` with a solidity (area /
        convex hull) below ``min_solidity``, or at least
        ``ragged_min_diameter_px`` across with a roundness (4 pi A / P**2,
        about 0.78 for a digital disk) below ``min_roundness``, are solar
        structure (dust shadows are round or donuts).
    sky_fraction : float
        Large regions darker than this fraction of the disk level are sky.
    limb_margin_px : int
        Objects within this distance of the sky are rejected.
    refine_margin_px : int
        Candidates are dilated by this much (plus their detection scale) for
        the harmonic background fill.
    motion_frames : int
        Frames read (evenly spaced) for the motion steps; 0 disables them.
    max_reported_rejections : int
        At most this many rejected objects are listed in
        ``params["rejected_objects"]``.
    motion_min_px : float
        Below this rms Sun motion (px) the frames cannot tell dust from the Sun
        and the motion steps are skipped (said in ``params["motion"]``).
    max_sun_coupling : float
        Objects whose structure follows the Sun's motion more than this (both
        coefficients of :func:`_sun_coupling`; 0 = fixed on the sensor, 1 =
        moves with the Sun) are solar features.
    fixed_map_binning : int
        Binning of the sensor-fixed map built from the frames; 0 disables it.
    fixed_seed_sigma : float
        Detection threshold (local noise units) on that map.
    fixed_min_ref_sigma : float
        A shadow found only on that map must also dip in the reference by at
        least this many noise units on average (its texture residues do not).
    """

    scales_px: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    background_factor: float = 12.0
    seed_sigma: float = 5.0
    seed_sigma_frames: float = 4.0
    grow_sigma: float = 3.0
    min_seed_depth: float = 0.01
    pixel_sigma: float = 3.0
    min_pixel_depth: float = 0.005
    rel_floor: float = 0.1
    min_area_px: int = 5
    speck_diameter_px: float = 8.0
    speck_min_depth: float = 0.04
    max_diameter_px: float = 160.0
    max_elongation: float = 2.5
    fibre_min_depth: float = 0.15
    max_fibre_length_px: float = 80.0
    max_particle_px: float = 12.0
    max_dust_depth: float = 0.95
    umbra_min_depth: float = 0.3
    min_core_share: float = 0.3
    umbra_max_elongation: float = 1.8
    min_solidity: float = 0.7
    min_roundness: float = 0.3
    ragged_min_diameter_px: float = 20.0
    sky_fraction: float = 0.15
    limb_margin_px: int = 6
    refine_margin_px: int = 3
    motion_frames: int = 24
    max_reported_rejections: int = 200
    motion_min_px: float = 1.0
    max_sun_coupling: float = 0.9
    fixed_map_binning: int = 2
    fixed_seed_sigma: float = 6.0
    fixed_min_ref_sigma: float = 0.0

    name = "classical"

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales_px"] = [float(s) for s in self.scales_px]
        return {"backend": self.name, **d}

    # ------------------------------------------------------------------ main
    def __call__(self, reference: np.ndarray, *, frames: Any = None) -> MaskResult:
        """Detect dust shadows in *reference*.

        Parameters
        ----------
        reference : numpy.ndarray
            ``(H, W)`` temporal median (or single image), arbitrary linear units,
            sensor orientation.
        frames : optional
            The video's frames: a :class:`~aiflat_local.io.ser.SerReader` (or
            anything with ``n_frames`` and ``frame(i)``), or an array / list of
            ``(H, W)`` frames in the same orientation as *reference*. Used, when
            the Sun moves enough, to tell solar features from dust and to
            find faint shadows hidden in texture (module documentation, step 6).

        Returns
        -------
        MaskResult
            ``mask`` float32 0/1 (1 = dust). ``objects``: one record per kept
            object: ``label``, ``y``, ``x`` (centroid, px), ``area`` (px),
            ``diameter`` (equivalent, px), ``depth`` (peak fractional
            deficit), and for objects of the image detector ``core_diameter``,
            ``significance``, ``elongation``, ``profile``, ``solidity``,
            ``roundness``, ``bbox`` and, with frames, ``sun_coupling``;
            objects found only on the sensor-fixed map have ``source:
            "motion"``. ``params``: every parameter, ``rejected`` (count per
            reason), ``rejected_objects`` (what was dropped and why),
            ``motion`` (registration facts or why it was skipped) and
            ``seconds``.

        Raises
        ------
        InputError
            Not a 2-D image, smaller than 8 px, or no finite pixel.
        """
        t0 = time.perf_counter()
        img = self._prepare(reference)
        h, w = img.shape
        params = self.params()
        level = float(np.percentile(img, 99))
        if not np.isfinite(level) or level <= 0:
            params.update(motion={"usable": False, "note": "no signal"}, n_objects=0, rejected={},
                          rejected_objects=[], note="no signal: the image is not positive",
                          seconds=round(time.perf_counter() - t0, 3))
            return MaskResult(np.zeros((h, w), np.float32), params, [])

        sky = self._sky(img)
        work = self._fill_sky(img, sky)
        ms = self._multiscale(work)
        motion: dict[str, Any] = {"usable": False, "note": "no frames given"}
        reg = None
        if frames is not None and self.motion_frames > 0:
            strong = ndimage.binary_dilation(ms["z"] > self.seed_sigma, iterations=3)
            reg = self._register(work, strong, frames)
            motion = reg["info"]
        use_motion = bool(motion.get("usable"))
        seed_sigma = self.seed_sigma_frames if use_motion else self.seed_sigma
        seeds = (ms["z"] > seed_sigma) & (ms["d"] > self.min_seed_depth) & ~sky
        grow = (ms["z"] > self.grow_sigma) & ~sky
        cand = _hysteresis(seeds, grow)
        rejected: dict[str, int] = {}
        dropped: list[dict[str, Any]] = []
        mask, objects = np.zeros((h, w), bool), []
        refused = np.zeros((h, w), bool)
        if cand.any():
            mask, objects, labels, cores, refused = self._refine(work, cand, seeds, ms, sky,
                                                                 rejected, dropped)
            if use_motion and objects:
                mask, objects, moved = self._motion_check(labels, cores, objects, reg, rejected,
                                                          dropped)
                refused |= moved
        if use_motion and self.fixed_map_binning > 0:
            mask, objects = self._add_sensor_fixed(mask, objects, refused, sky, reg, motion, ms)
        for k, ob in enumerate(objects, start=1):
            ob["label"] = k
            ob.pop("_lab", None)
        motion["seed_sigma_used"] = seed_sigma
        params.update(motion=motion, n_objects=len(objects), rejected=rejected,
                      rejected_objects=dropped[: self.max_reported_rejections],
                      sky_fraction_of_image=float(sky.mean()),
                      seconds=round(time.perf_counter() - t0, 3))
        return MaskResult(mask.astype(np.float32), params, objects)

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _prepare(reference: np.ndarray) -> np.ndarray:
        return prepare_reference(reference, "classical")

    def _sky(self, img: np.ndarray) -> np.ndarray:
        """Sky (off-disk) pixels, grown by the limb margin.

        Sky is darker than ``sky_fraction`` of the disk level (the 90th
        percentile of a smoothed, reduced image) *and* part of a large region
        (at least 1 % of the image): an opaque dust shadow is dark too, but small.
        """
        f = max(1, min(img.shape) // 128)
        coarse = ndimage.gaussian_filter(_block_mean(img, f), 1.0)
        threshold = self.sky_fraction * float(np.percentile(coarse, 90))
        lab, n = ndimage.label(coarse < threshold)
        if n == 0:
            return np.zeros(img.shape, bool)
        areas = np.bincount(lab.ravel())
        big = areas >= max(16, 0.01 * coarse.size)
        big[0] = False
        if not big[1:].any():
            return np.zeros(img.shape, bool)
        sky_c = ndimage.binary_dilation(big[lab], iterations=1)
        near = _upsample(sky_c.astype(np.float32), f, img.shape) > 0.01
        sky = near & (ndimage.gaussian_filter(img, 1.0) < threshold)
        if self.limb_margin_px > 0:
            sky = ndimage.binary_dilation(sky, iterations=int(self.limb_margin_px))
        return sky

    @staticmethod
    def _fill_sky(img: np.ndarray, sky: np.ndarray) -> np.ndarray:
        """Replace sky pixels by the nearest disk pixel's value (no limb in the filters)."""
        if not sky.any() or sky.all():
            return img
        idx = ndimage.distance_transform_edt(sky, return_distances=False, return_indices=True)
        return img[idx[0], idx[1]]

    def _multiscale(self, img: np.ndarray) -> dict[str, np.ndarray]:
        """Per-scale significance, maximised over scales.

        Returns ``z`` (max significance), ``d`` (the deficit at that scale),
        ``k`` (index of that scale, int8), ``dk`` and ``sigmas`` (the per-scale
        deficit and local noise maps, stacked, float32).
        """
        zmax = np.full(img.shape, -np.inf, np.float32)
        dmax = np.zeros(img.shape, np.float32)
        kmax = np.zeros(img.shape, np.int8)
        sigmas, dks = [], []
        for k, s in enumerate(self.scales_px):
            window = self.background_factor * s
            f = max(2, int(round(window / 5)))  # median over ~5 x 5 coarse pixels: cheap
            bg = ndimage.median_filter(_block_mean(img, f), size=_odd(window / f), mode="reflect")
            bg = _upsample(bg, f, img.shape)
            smooth = _smooth(img, s) if s > 0 else img
            d = 1.0 - smooth / np.maximum(bg, 1e-12)
            sigma = _local_sigma(d, tile=max(64, int(8 * s)), floor=1e-4)
            sigmas.append(sigma)
            dks.append(d)
            z = d / sigma
            better = z > zmax
            zmax[better] = z[better]
            dmax[better] = d[better]
            kmax[better] = k
        return {"z": zmax, "d": dmax, "k": kmax, "sigmas": np.stack(sigmas), "dk": np.stack(dks)}

    def _refine(self, img, cand, seeds, ms, sky, rejected, dropped):
        """Harmonic background around each candidate, final objects, physical checks."""
        h, w = img.shape
        scales = np.asarray(self.scales_px, dtype=np.float64)
        labels_c, n_c = ndimage.label(cand, structure=_EIGHT)
        # scale of each candidate: the scale of its most significant seed pixel
        zs = np.where(seeds, ms["z"], -np.inf)
        best = _label_argmax(zs, labels_c, n_c)
        k_c = np.array([ms["k"][p] for p in best], dtype=np.int64)
        region = np.zeros((h, w), bool)
        for k in np.unique(k_c):
            sel = np.zeros(n_c + 1, bool)
            sel[1:] = k_c == k
            grown = ndimage.binary_dilation(sel[labels_c], structure=_EIGHT,
                                            iterations=int(self.refine_margin_px + scales[k]))
            region |= grown
        region &= ~sky
        if region.all() or not region.any():
            zero = np.zeros((h, w), np.int32)
            return np.zeros((h, w), bool), [], zero, zero, np.zeros((h, w), bool)
        smooth1 = ndimage.gaussian_filter(img, 1.0)
        # the background is smooth: fill it at half resolution (4x fewer unknowns)
        coarse_region = _block_mean(region.astype(np.float32), 2) > 0
        if coarse_region.all():
            coarse_region[0, 0] = False
        bg_c = HarmonicInpainter()(_block_mean(smooth1, 2), coarse_region).image
        bg = np.where(region, _upsample(bg_c, 2, (h, w)), smooth1)
        d_raw = np.where(region, 1.0 - img / np.maximum(bg, 1e-12), 0.0).astype(np.float32)
        # A pixel belongs to an object when it is significant at some scale up
        # to the object's detection scale, and still dips at the finest scale
        # (so a blurred deep shadow does not spill over its neighbours), by at
        # least rel_floor of its nearest candidate's peak.
        owner = _nearest_label(labels_c, region)
        k_map = np.zeros(n_c + 1, np.int64)
        k_map[1:] = k_c
        k_owner = k_map[owner]
        n1 = ms["sigmas"][0]
        d1 = ndimage.gaussian_filter(d_raw, 1.0)
        significant = region & (d1 > self.pixel_sigma * n1)
        for k in range(1, int(k_c.max()) + 1):
            dk = _smooth(d_raw, scales[k] / 2.0)
            nk = ms["sigmas"][int(np.argmin(np.abs(scales - scales[k] / 2.0)))]
            significant |= region & (k_owner >= k) & (dk > self.pixel_sigma * nk)
        peak = _label_max(d1, labels_c, n_c)
        floor = np.maximum(np.maximum(self.rel_floor * peak[owner], self.min_pixel_depth), n1)
        strong = significant & (d1 > floor)
        obj = _hysteresis(strong & seeds, strong)
        obj = ndimage.binary_fill_holes(obj)
        dsm, nsig = d1, n1
        mask, objects, labels, cores, refused = self._select(obj, d_raw, dsm, nsig, sky, rejected,
                                                             dropped)
        return mask, objects, labels, cores, refused

    def _register(self, img: np.ndarray, exclude: np.ndarray, frames: Any) -> dict[str, Any]:
        """Sun offset of up to ``motion_frames`` frames relative to the reference.

        :func:`._frames.register_sample`: the motion flat's registration
        (band-passed cross-correlation, then Gauss-Newton, on the central
        512 x 512 px) against the middle frame, one pass, *exclude* left out
        (the strongest dark spots, so dust does not pull the estimate towards
        zero); the shifts are then taken about their median. (Matching
        the median image instead, as this masker once did with its own
        correlation, is 10-100 times less accurate: the median is the Sun
        smeared by the motion. Against a frame: 0.005-0.015 px rms on the
        simulator, 480 x 640, 24 frames; against the median 0.06-0.3 px.) Returns
        ``{"indices", "shifts" (n, 2), "scales" (per-frame brightness factor
        to the median frame), "get", "binned", "info"}``; ``info["usable"]``
        says whether the motion is large enough (``motion_min_px`` rms) to tell
        dust from the Sun.
        """
        from ._frames import register_sample

        sample, info = register_sample(frames, img.shape, n_frames=self.motion_frames, exclude=exclude,
                                       min_rms_px=self.motion_min_px)
        out: dict[str, Any] = {"info": info}
        if sample is None:
            return out
        binned = None
        fb = int(self.fixed_map_binning)
        if fb > 0:
            binned = np.stack([_block_mean(sample.get(int(i)), fb) * np.float32(sc)
                               for i, sc in zip(sample.indices, sample.scales)])
        out.update(indices=sample.indices, shifts=sample.shifts, scales=sample.scales, get=sample.get,
                   binned=binned)
        return out

    def _motion_check(self, labels, cores, objects, reg, rejected, dropped):
        """Drop objects that move with the Sun instead of staying on the sensor.

        For each object, the frames around it (re-read one at a time) are
        compared with their median: had the object moved with the Sun, frame
        ``i`` would differ from the median by the median shifted by the frame's
        Sun offset, minus the median. :func:`_sun_coupling` measures how much of
        that prediction the frames follow (1 = moves with the Sun, 0 = fixed on
        the sensor); above ``max_sun_coupling`` the object is a solar feature
        (pore, sunspot, dark texture) and is dropped. Pores and sunspots look
        exactly like dust in one image: this is what tells them apart.
        """
        h, w = labels.shape
        shifts, scales, get = reg["shifts"], reg["scales"], reg["get"]
        reach = int(math.ceil(np.abs(shifts).max())) + 5
        boxes = []
        for ob in objects:
            by0, bx0, by1, bx1 = ob["bbox"]
            boxes.append((max(by0 - reach, 0), min(by1 + reach, h),
                          max(bx0 - reach, 0), min(bx1 + reach, w)))
        patches: list[list[np.ndarray]] = [[] for _ in objects]
        for i, scale in zip(reg["indices"], scales):
            f = get(int(i))
            for k, (ya, yb, xa, xb) in enumerate(boxes):
                patches[k].append(f[ya:yb, xa:xb] * np.float32(scale))
        keep = np.zeros(int(labels.max()) + 1, bool)
        kept_objects = []
        for ob, (ya, yb, xa, xb), stack in zip(objects, boxes, patches):
            stack = np.stack(stack)
            support = ndimage.binary_dilation(cores[ya:yb, xa:xb] == ob["_lab"], iterations=3)
            coupling = _sun_coupling(stack, np.median(stack, axis=0), shifts, support,
                                     max(1.0, 0.15 * float(ob["diameter"])))
            ob["sun_coupling"] = [round(c, 3) for c in coupling]
            if min(coupling) > self.max_sun_coupling:
                rejected["moves_with_sun"] = rejected.get("moves_with_sun", 0) + 1
                dropped.append({"reason": "moves_with_sun", "y": ob["y"], "x": ob["x"],
                                "diameter": ob["diameter"], "depth": ob["depth"],
                                "sun_coupling": ob["sun_coupling"]})
                continue
            keep[ob["_lab"]] = True
            kept_objects.append(ob)
        kept = keep[labels]
        return kept, kept_objects, (labels > 0) & ~kept

    def _add_sensor_fixed(self, mask, objects, refused, sky, reg, motion, ms):
        """Add the shadows that only the motion reveals (faint ones on strong texture).

        The Sun alone is rebuilt from the frames, binned by ``fixed_map_binning``:
        the median of the frames aligned on the Sun (dust smeared out), shifted
        back by every frame's offset and medianed again (the Sun exactly as the
        median of the frames shows it). The median of the unaligned frames over
        that is the sensor's own pattern: the solar texture cancels, dust stays
        (whole for shadows smaller than the motion, their edges for larger ones;
        holes are filled). Significant dips of that map, at ``fixed_seed_sigma``,
        are added to the mask unless they touch an object already refused
        (the Sun's own dark features leave a faint trace there too).
        """
        h, w = mask.shape
        f = int(self.fixed_map_binning)
        shifts = reg["shifts"] / f
        stack = reg["binned"]
        moved = np.empty_like(stack)
        for k, (dy, dx) in enumerate(shifts):
            moved[k] = ndimage.shift(stack[k], (-dy, -dx), order=1, mode="nearest")
        sun = np.median(moved, axis=0)
        for k, (dy, dx) in enumerate(shifts):
            moved[k] = ndimage.shift(sun, (dy, dx), order=1, mode="nearest")
        sun_at_ref = np.median(moved, axis=0)
        del moved
        ref = np.median(stack, axis=0)
        deficit = 1.0 - ref / np.maximum(sun_at_ref, 1e-12)
        edge = int(math.ceil(np.abs(shifts).max())) + 2
        valid = np.zeros(deficit.shape, bool)
        valid[edge:-edge or None, edge:-edge or None] = True
        valid &= ~(_block_mean(sky.astype(np.float32), f) > 0)
        deficit = np.where(valid, deficit, 0.0).astype(np.float32)
        zmax = np.full(deficit.shape, -np.inf, np.float32)
        for sigma in (1.0, 2.0):
            d = ndimage.gaussian_filter(deficit, sigma)
            zmax = np.maximum(zmax, d / _local_sigma(d, 64, 1e-5))
        found = _hysteresis((zmax > self.fixed_seed_sigma) & valid,
                            (zmax > self.grow_sigma) & valid)
        found = ndimage.binary_fill_holes(found)
        full = np.repeat(np.repeat(found, f, axis=0), f, axis=1)[:h, :w]
        lab, n = ndimage.label(full, structure=_EIGHT)
        blocked = ndimage.binary_dilation(refused, iterations=2) if refused.any() else refused
        dep = _upsample(deficit, f, (h, w))
        scales = np.asarray(self.scales_px, dtype=np.float64)
        added = 0
        for i, sl in enumerate(ndimage.find_objects(lab), start=1):
            if sl is None:
                continue
            m = lab[sl] == i
            area = int(m.sum())
            if area < max(self.min_area_px, f * f * 4) or (blocked[sl] & m).any():
                continue
            # the reference itself must be darker there, on average, at the
            # object's scale (texture residues of the motion map are not)
            k = int(np.argmin(np.abs(np.log(scales / max(math.sqrt(area) / 3, 1.0)))))
            z_ref = float(ms["dk"][k][sl][m].mean() / ms["sigmas"][k][sl][m].mean())
            if z_ref < self.fixed_min_ref_sigma:
                continue
            new = m & ~mask[sl]
            mask[sl] |= m
            if (m & ~new).any():
                continue  # grows an object already found
            ys, xs = np.nonzero(m)
            added += 1
            objects.append({
                "label": 0, "y": round(float(ys.mean() + sl[0].start), 2),
                "x": round(float(xs.mean() + sl[1].start), 2), "area": area,
                "diameter": round(2 * math.sqrt(area / math.pi), 2),
                "depth": round(float(dep[sl][m].max()), 4), "source": "motion",
                "bbox": [int(sl[0].start), int(sl[1].start), int(sl[0].stop), int(sl[1].stop)],
            })
        motion["n_added_from_motion"] = added
        return mask, objects

    def _split(self, obj: np.ndarray, d1: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Split touching shadows: one object per core (part deeper than a quarter of its peak).

        Returns ``(labels, cores, n)``: every pixel of *obj* goes to its nearest
        core, so a deep spot touching a faint ring or a texture dip is judged on
        its own.
        """
        parents, n_p = ndimage.label(obj, structure=_EIGHT)
        if n_p == 0:
            return parents, parents, 0
        peak = _label_max(d1, parents, n_p)
        core_mask = obj & (d1 >= 0.25 * peak[parents])
        # only deep objects are split (a faint one's core is noisy: splitting
        # it would only make fragments); a faint object keeps its parent label
        deep = peak >= 0.1
        split, n_split = ndimage.label(core_mask & deep[parents], structure=_EIGHT)
        cores = np.where(core_mask & ~deep[parents], parents + n_split, split)
        cores[~core_mask] = 0
        labels = _nearest_label(cores, obj)
        # relabel compactly (some faint parents' numbers are unused)
        used = np.unique(labels[labels > 0])
        lut = np.zeros(n_split + n_p + 1, np.int64)
        lut[used] = np.arange(1, used.size + 1)
        n = int(used.size)
        return lut[labels], lut[cores], n

    def _select(self, obj, d_raw, dsm, nsig, sky, rejected, dropped):
        """Measure each object and keep what is plausibly dust.

        Returns the kept mask, the object records, and the kept objects' label
        and core images (same label numbers, 0 elsewhere).
        """
        d1 = ndimage.gaussian_filter(d_raw, 0.7)
        labels, cores, n = self._split(obj, d1)
        keep = np.zeros(n + 1, bool)
        objects: list[dict[str, Any]] = []
        near_sky = ndimage.binary_dilation(sky, iterations=1) if sky.any() else sky
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            m = labels[sl] == lab
            area = int(m.sum())
            ys, xs = np.nonzero(m)
            diam = 2 * math.sqrt(area / math.pi)
            depth = float(d1[sl][m].max())
            z = float((dsm[sl][m] / nsig[sl][m]).max())
            # the physics and shape rules judge the core (deeper than a quarter
            # of the peak): a faint ring around a deep spot must not make the
            # spot look huge
            cys, cxs = np.nonzero(cores[sl] == lab)
            core_diam = 2 * math.sqrt(max(cys.size, 1) / math.pi)
            major, minor, elong = _moments(cys, cxs)
            # umbra/penumbra: share of the clearly dark part (>= 0.15, or a
            # third of the peak) that is deeper than half the peak
            dm = d1[sl][m]
            dark_part = int(np.count_nonzero(dm >= min(0.15, depth / 3)))
            profile = int(np.count_nonzero(dm >= 0.5 * depth)) / max(dark_part, 1)
            solidity = _solidity(ys, xs)
            roundness = _roundness(m)
            reason = None
            if area < self.min_area_px:
                reason = "small"
            elif diam < self.speck_diameter_px and depth < self.speck_min_depth:
                reason = "faint_speck"
            elif (near_sky[sl] & m).any():
                reason = "limb"
            elif diam > self.max_diameter_px:
                reason = "large"
            elif elong > self.max_elongation and not (
                    depth >= self.fibre_min_depth and major <= self.max_fibre_length_px):
                reason = "elongated"
            elif depth > plausible_depth(core_diam, self.max_particle_px, self.max_dust_depth):
                reason = "too_dark"
            elif depth >= self.umbra_min_depth and profile < self.min_core_share \
                    and elong <= self.umbra_max_elongation:
                reason = "umbra_penumbra"
            elif depth < self.fibre_min_depth and (
                    solidity < self.min_solidity
                    or (diam >= self.ragged_min_diameter_px and roundness < self.min_roundness)):
                reason = "irregular"
            if reason:
                rejected[reason] = rejected.get(reason, 0) + 1
                if reason not in ("small", "faint_speck"):
                    dropped.append({"reason": reason, "y": round(float(ys.mean() + sl[0].start), 1),
                                    "x": round(float(xs.mean() + sl[1].start), 1),
                                    "diameter": round(diam, 1),
                                    "core_diameter": round(core_diam, 1),
                                    "depth": round(depth, 3), "elongation": round(elong, 2),
                                    "profile": round(profile, 3), "solidity": round(solidity, 3)})
                continue
            keep[lab] = True
            objects.append({
                "label": len(objects) + 1, "_lab": lab,
                "y": round(float(ys.mean() + sl[0].start), 2),
                "x": round(float(xs.mean() + sl[1].start), 2),
                "area": area, "diameter": round(diam, 2), "core_diameter": round(core_diam, 2),
                "depth": round(depth, 4), "significance": round(z, 2),
                "elongation": round(elong, 2), "profile": round(profile, 3),
                "solidity": round(solidity, 3), "roundness": round(roundness, 3),
                "bbox": [int(sl[0].start), int(sl[1].start), int(sl[0].stop), int(sl[1].stop)],
            })
        kept = keep[labels]
        self_rejected = obj & ~kept
        return (kept, objects, np.where(kept, labels, 0), np.where(keep[cores], cores, 0),
                self_rejected)


# --------------------------------------------------------------------------- motion
def _fourier_shifts(img: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """``img`` shifted by each ``(dy, dx)`` of *shifts* (sub-pixel, Fourier), stacked.

    ``out[i][y, x] = img[y - dy_i, x - dx_i]``; the image is edge-padded by the
    largest shift first so nothing wraps around into it.
    """
    pad = int(math.ceil(np.abs(shifts).max())) + 2
    a = np.pad(img.astype(np.float64), pad, mode="edge")
    spec = np.fft.rfft2(a)
    ky = np.fft.fftfreq(a.shape[0])[None, :, None]
    kx = np.fft.rfftfreq(a.shape[1])[None, None, :]
    phase = np.exp(-2j * np.pi * (ky * shifts[:, 0, None, None] + kx * shifts[:, 1, None, None]))
    out = np.fft.irfft2(spec[None] * phase, s=a.shape, axes=(1, 2))
    return out[:, pad:pad + img.shape[0], pad:pad + img.shape[1]]


def _sun_coupling(stack: np.ndarray, ref: np.ndarray, shifts: np.ndarray, support: np.ndarray,
                  smooth_px: float) -> tuple[float, float]:
    """How much of an object's structure moves with the Sun (1) or stays on the sensor (0).

    ``stack`` holds the frames around the object (sensor coordinates), ``ref``
    their median, ``shifts`` each frame's Sun offset. If the object moved with
    the Sun, frame ``i`` would differ from ``ref`` by ``shift(ref, s_i) - ref``.
    Returns two least-squares coefficients of the frame differences on that
    prediction, over *support*: for the whole structure, and for its smooth
    part (Gaussian *smooth_px*, the object's own shape) fitted jointly with
    the fine residual (the solar texture on top of it), which keeps texture
    moving over a faint dust shadow from passing for the shadow moving.
    """
    smooth = ndimage.gaussian_filter(ref, smooth_px)
    whole = _fourier_shifts(ref, shifts)[:, support] - ref[support]
    part = _fourier_shifts(smooth, shifts)[:, support] - smooth[support]
    diff = stack[:, support] - ref[support]
    fine = whole - part
    num = float((diff * whole).sum())
    den = float((whole * whole).sum())
    # 2 x 2 normal equations, element-wise (no BLAS threads on busy cores)
    gram = np.array([[(part * part).sum(), (part * fine).sum()],
                     [(part * fine).sum(), (fine * fine).sum()]], dtype=np.float64)
    rhs = np.array([(part * diff).sum(), (fine * diff).sum()], dtype=np.float64)
    whole_c = num / max(den, 1e-12)
    try:
        shape_c = float(np.linalg.solve(gram + 1e-12 * np.eye(2), rhs)[0])
    except np.linalg.LinAlgError:
        shape_c = whole_c
    return float(whole_c), shape_c


def _solidity(ys: np.ndarray, xs: np.ndarray) -> float:
    """Area over convex-hull area of a pixel set (1 = convex; pixel squares, not centres)."""
    if ys.size < 3:
        return 1.0
    from scipy.spatial import ConvexHull, QhullError

    corners = np.concatenate([np.stack([ys + dy, xs + dx], axis=1)
                              for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)])
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return 1.0
    return float(min(1.0, ys.size / max(hull.volume, 1e-12)))


def _roundness(m: np.ndarray) -> float:
    """``4 pi area / perimeter**2`` of a mask, perimeter counted as pixel edges.

    Edge counting over-estimates a smooth boundary by 4/pi, so a digital disk
    scores about pi/4 = 0.785; a ragged outline scores much less.
    """
    a = np.pad(m, 1)
    edges = (np.count_nonzero(a[1:, :] != a[:-1, :]) + np.count_nonzero(a[:, 1:] != a[:, :-1]))
    return float(4 * math.pi * np.count_nonzero(m) / max(edges, 1) ** 2)


def _hysteresis(seeds: np.ndarray, grow: np.ndarray) -> np.ndarray:
    """Connected components (8-connected) of *grow* that contain a seed."""
    labels, n = ndimage.label(grow | seeds, structure=_EIGHT)
    if n == 0:
        return np.zeros(grow.shape, bool)
    hit = np.zeros(n + 1, bool)
    hit[np.unique(labels[seeds])] = True
    hit[0] = False
    return hit[labels]

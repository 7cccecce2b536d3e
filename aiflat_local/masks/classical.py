"""The classical dust masker: deterministic, no weights, a few seconds per image.

What it looks for
-----------------
In a temporal median of a solar video, a dust shadow is a *multiplicative*
dip fixed to the sensor: dark, compact, round or donut-shaped, from ~3 px to
~100+ px across, 1.5 % to ~60 % deep, often with a faint bright rim. The
physics ties depth to size: a particle of diameter ``p`` at a distance that
spreads the beam over a footprint ``f`` (``f = distance / f-ratio``) casts a
shadow about ``f + p`` across and ``(p / f)**2`` deep, so big shadows are
faint and deep shadows are small (a 40 px shadow 50 % deep would need a
particle ~17 px = 60 um across, rare on a window; a sunspot umbra is that).

How
---
1. **Disk**: pixels below ``sky_fraction`` of the bright disk level (smoothed)
   are sky; they are replaced by the nearest disk value before any filtering
   (so the limb does not bias the background) and detections on the sky or
   within ``limb_margin_px`` of it are rejected.
2. **Multi-scale deficit**: for each Gaussian scale ``s`` in ``scales_px``
   the image smoothed by ``s`` is compared with a background that is the
   median over a window of ``background_factor * s`` px computed at reduced
   resolution (so a blob much smaller than the window is ignored by it, at
   every size, and the cost stays low): ``deficit_s = 1 - smooth_s / bg_s``.
   Each deficit map is divided by its own robust local noise (1.4826 x MAD
   in tiles), which includes the solar texture at that scale.
3. **Hysteresis**: seeds where some scale is ``seed_sigma`` significant and
   at least ``min_seed_depth`` deep, grown over ``grow_sigma``.
4. **Refinement**: the background inside each candidate (dilated) is
   re-estimated by a harmonic fill from the pixels around it, which works for
   blobs of any size; the object is the connected set of pixels at least
   ``pixel_sigma`` significant against it (holes, e.g. donut centres, filled).
5. **Rejection** of what is not dust: objects on the sky or limb, larger than
   ``max_diameter_px``, elongated beyond ``max_elongation`` (filaments; a
   thin dust fibre is kept while shorter than ``max_fibre_length_px``), and
   objects deeper than physically plausible for their size (sunspots, see
   :func:`plausible_depth`).

The mask is the detection itself, not expanded: expansion and feathering
belong to :mod:`aiflat_local.flat`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..inpaint.harmonic import HarmonicInpainter
from .base import MASKERS, MaskResult

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
    a = np.pad(img, ((0, hp - h), (0, wp - w)), mode="edge")
    return a.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


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


def _local_sigma(d: np.ndarray, tile: int, floor: float) -> np.ndarray:
    """Robust local noise (1.4826 x MAD) of *d* in ``tile x tile`` tiles, smoothed, upsampled."""
    h, w = d.shape
    tile = max(8, min(tile, max(h, w)))
    th, tw = -(-h // tile), -(-w // tile)
    a = np.pad(d, ((0, th * tile - h), (0, tw * tile - w)), mode="reflect")
    blocks = a.reshape(th, tile, tw, tile).transpose(0, 2, 1, 3).reshape(th, tw, -1)
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
@MASKERS.register("classical", "multi-scale deficit detector with physical dust checks (no weights)")
@dataclass
class ClassicalMasker:
    """Deterministic dust masker (see the module documentation for the method).

    Parameters
    ----------
    scales_px : tuple of float
        Gaussian smoothing scales (px) of the multi-scale detection; a scale
        ``s`` is most sensitive to shadows about ``3 s`` across.
    background_factor : float
        Background median window = ``background_factor * s`` px at scale ``s``.
    seed_sigma, grow_sigma : float
        Hysteresis thresholds, in units of the local noise at each scale.
    min_seed_depth : float
        A seed must also be at least this deep (fraction, 0.01 = 1 %).
    pixel_sigma : float
        Refinement threshold (local pixel noise units) against the harmonic
        background.
    min_pixel_depth : float
        And every refined pixel at least this deep (fraction).
    rel_floor : float
        And at least this fraction of its object's peak depth (stops a deep
        shadow from growing into the surrounding texture).
    min_area_px : int
        Smaller objects are dropped (hot/cold pixels, noise).
    speck_diameter_px, speck_min_depth : float
        Objects smaller than this (equivalent diameter, px) and shallower than
        this (fraction) are dropped: a shadow that small comes from dust
        close to the sensor, which is deep; a tiny faint dip is noise or
        granulation.
    max_diameter_px : float
        Objects with a larger equivalent diameter are not dust.
    max_elongation : float
        Major/minor axis ratio beyond which an object longer than
        ``max_fibre_length_px`` is a solar filament, not dust.
    max_fibre_length_px : float
        See *max_elongation*.
    max_particle_px : float
        Largest dust particle assumed (px); sets :func:`plausible_depth`.
    max_dust_depth : float
        No dust shadow is deeper than this (fraction).
    sky_fraction : float
        Pixels darker than this fraction of the disk level are sky.
    limb_margin_px : int
        Objects within this distance of the sky are rejected.
    refine_margin_px : int
        Candidates are dilated by this much before the harmonic background fill.
    """

    scales_px: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    background_factor: float = 12.0
    seed_sigma: float = 6.0
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
    max_dust_depth: float = 0.75
    sky_fraction: float = 0.15
    limb_margin_px: int = 6
    refine_margin_px: int = 3
    motion_frames: int = 24
    motion_min_px: float = 1.0
    max_sun_coupling: float = 0.9

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
            Ignored (this masker uses the reference only).

        Returns
        -------
        MaskResult
            ``mask`` float32 0/1; ``objects`` with ``label``, ``y``, ``x``
            (centroid, px), ``area``, ``diameter`` (equivalent, px), ``depth``
            (peak fractional deficit), ``significance``, ``elongation``;
            ``params`` with every parameter, counts of rejected candidates per
            reason and the run time.
        """
        t0 = time.perf_counter()
        img = self._prepare(reference)
        h, w = img.shape
        params = self.params()
        empty = MaskResult(np.zeros((h, w), np.float32), params, [])
        level = float(np.percentile(img, 99))
        if not np.isfinite(level) or level <= 0:
            params.update(n_objects=0, seconds=time.perf_counter() - t0, note="no signal")
            return empty

        sky = self._sky(img, level)
        work = self._fill_sky(img, sky)
        ms = self._multiscale(work)
        seeds = (ms["z"] > self.seed_sigma) & (ms["d"] > self.min_seed_depth) & ~sky
        grow = (ms["z"] > self.grow_sigma) & ~sky
        cand = _hysteresis(seeds, grow)
        rejected: dict[str, int] = {}
        motion: dict[str, Any] = {"used": False}
        if cand.any():
            mask, objects, labels, cores, bg = self._refine(work, cand, seeds, ms, sky, rejected)
            if frames is not None and self.motion_frames > 0 and objects:
                mask, objects, motion = self._motion_check(work, labels, cores, objects, frames,
                                                           rejected)
            for ob in objects:
                ob.pop("_lab", None)
        else:
            mask, objects = np.zeros((h, w), bool), []
        params.update(motion=motion, n_objects=len(objects), rejected=rejected,
                      sky_fraction_of_image=float(sky.mean()),
                      seconds=round(time.perf_counter() - t0, 3))
        return MaskResult(mask.astype(np.float32), params, objects)

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _prepare(reference: np.ndarray) -> np.ndarray:
        img = np.asarray(reference)
        if img.ndim != 2:
            raise InputError(f"the classical masker needs a 2-D image, got shape {img.shape}")
        if min(img.shape) < 8:
            raise InputError(f"image too small for dust detection: {img.shape[1]} x {img.shape[0]}")
        img = img.astype(np.float32, copy=True)
        bad = ~np.isfinite(img)
        if bad.all():
            raise InputError("the image has no finite pixel")
        if bad.any():
            img[bad] = np.median(img[~bad])
        return img

    def _sky(self, img: np.ndarray, level: float) -> np.ndarray:
        """Sky (off-disk) pixels, from a smoothed image, grown by the limb margin."""
        f = max(1, min(img.shape) // 128)
        coarse = ndimage.gaussian_filter(_block_mean(img, f), 1.0)
        disk_level = float(np.percentile(coarse, 90))
        sky_c = coarse < self.sky_fraction * disk_level
        if not sky_c.any():
            return np.zeros(img.shape, bool)
        sky = _upsample(sky_c.astype(np.float32), f, img.shape) > 0.5
        sky |= ndimage.gaussian_filter(img, 1.0) < self.sky_fraction * disk_level
        return ndimage.binary_dilation(sky, iterations=max(int(self.limb_margin_px), 0)) \
            if self.limb_margin_px > 0 else sky

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
        ``k`` (index of that scale, int8) and ``sigmas`` (the per-scale local
        noise maps, stacked, float32).
        """
        zmax = np.full(img.shape, -np.inf, np.float32)
        dmax = np.zeros(img.shape, np.float32)
        kmax = np.zeros(img.shape, np.int8)
        sigmas = []
        for k, s in enumerate(self.scales_px):
            window = self.background_factor * s
            f = max(2, int(round(window / 7)))  # median over ~7 x 7 coarse pixels: cheap
            bg = ndimage.median_filter(_block_mean(img, f), size=_odd(window / f), mode="reflect")
            bg = _upsample(bg, f, img.shape)
            smooth = ndimage.gaussian_filter(img, s, mode="reflect") if s > 0 else img
            d = 1.0 - smooth / np.maximum(bg, 1e-12)
            sigma = _local_sigma(d, tile=max(64, int(8 * s)), floor=1e-4)
            sigmas.append(sigma)
            z = d / sigma
            better = z > zmax
            zmax[better] = z[better]
            dmax[better] = d[better]
            kmax[better] = k
        return {"z": zmax, "d": dmax, "k": kmax, "sigmas": np.stack(sigmas)}

    def _refine(self, img, cand, seeds, ms, sky, rejected):
        """Harmonic background around each candidate, final objects, physical checks."""
        h, w = img.shape
        scales = np.asarray(self.scales_px, dtype=np.float64)
        labels_c, n_c = ndimage.label(cand, structure=_EIGHT)
        # scale of each candidate: the scale of its most significant seed pixel
        zs = np.where(seeds, ms["z"], -np.inf)
        best = ndimage.maximum_position(zs, labels_c, index=np.arange(1, n_c + 1))
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
            return np.zeros((h, w), bool), [], zero, zero, img
        smooth1 = ndimage.gaussian_filter(img, 1.0)
        bg = HarmonicInpainter()(smooth1, region).image
        d_raw = np.where(region, 1.0 - img / np.maximum(bg, 1e-12), 0.0).astype(np.float32)
        # A pixel belongs to an object when it is significant at some scale up
        # to the object's detection scale, and still dips at the finest scale
        # (so a blurred deep shadow does not spill over its neighbours), by at
        # least rel_floor of its nearest candidate's peak.
        owner_idx = ndimage.distance_transform_edt(labels_c == 0, return_distances=False,
                                                   return_indices=True)
        owner = labels_c[owner_idx[0], owner_idx[1]]
        del owner_idx
        k_map = np.zeros(n_c + 1, np.int64)
        k_map[1:] = k_c
        k_owner = k_map[owner]
        n1 = ms["sigmas"][0]
        d1 = ndimage.gaussian_filter(d_raw, 1.0)
        significant = region & (d1 > self.pixel_sigma * n1)
        for k in range(1, int(k_c.max()) + 1):
            dk = ndimage.gaussian_filter(d_raw, scales[k] / 2.0)
            nk = ms["sigmas"][int(np.argmin(np.abs(scales - scales[k] / 2.0)))]
            significant |= region & (k_owner >= k) & (dk > self.pixel_sigma * nk)
        peak = np.zeros(n_c + 1, np.float32)
        peak[1:] = ndimage.maximum(d1, labels_c, index=np.arange(1, n_c + 1))
        floor = np.maximum(np.maximum(self.rel_floor * peak[owner], self.min_pixel_depth), n1)
        strong = significant & (d1 > floor)
        obj = _hysteresis(strong & seeds, strong)
        obj = ndimage.binary_fill_holes(obj)
        dsm, nsig = d1, n1
        mask, objects, labels, cores = self._select(obj, d_raw, dsm, nsig, sky, rejected)
        return mask, objects, labels, cores, bg

    def _motion_check(self, img, labels, cores, objects, frames, rejected):
        """Drop objects that move with the Sun rather than staying on the sensor.

        From up to ``motion_frames`` frames: register each to the reference
        (band-pass cross-correlation, sub-pixel, detections excluded), then for each object
        rebuild, from the frames around it, the Sun alone: the median of the
        frames aligned on the Sun (dust smeared out), shifted back by each
        frame's offset and medianed again (the Sun as the reference shows
        it). Their ratio keeps what is fixed to the sensor. ``ratio`` is the
        share of the object's deficit that survives; below
        ``motion_min_ratio`` the object is a solar feature (pore, sunspot,
        dark texture). Skipped when the frames barely move
        (``motion_min_px``), which is then stated in ``params["motion"]``.
        """
        mask = labels > 0
        n_total, get = _frame_source(frames)
        info: dict[str, Any] = {"used": False, "n_frames_read": 0}
        if n_total < 3:
            info["note"] = "fewer than 3 frames"
            return mask, objects, info
        idx = np.unique(np.linspace(0, n_total - 1, min(n_total, int(self.motion_frames))).round().astype(int))
        h, w = img.shape
        ch, cw = min(h, 512), min(w, 512)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        crop = (slice(y0, y0 + ch), slice(x0, x0 + cw))
        exclude = ndimage.binary_dilation(mask, iterations=4)[crop]
        ref_f = np.fft.rfft2(_bandpass(img[crop], exclude))
        max_shift = max(2, min(ch, cw) // 4)
        pad = 4
        boxes = [ob["bbox"] for ob in objects]
        frames_kept, shifts, scales = [], [], []
        for i in idx:
            f = get(int(i))
            if f.shape != img.shape:
                info["note"] = f"frame shape {f.shape} differs from the reference {img.shape}"
                return mask, objects, info
            dy, dx = _xcorr_shift(ref_f, _bandpass(f[crop], exclude), max_shift)
            scale = float(np.median(img[crop]) / max(float(np.median(f[crop])), 1e-12))
            shifts.append((dy, dx))
            scales.append(scale)
            frames_kept.append(f)
        shifts = np.array(shifts)
        shifts -= np.median(shifts, axis=0)
        spread = float(np.sqrt((shifts ** 2).sum(axis=1).mean()))
        info.update(n_frames_read=len(idx), shift_rms_px=round(spread, 3))
        if spread < self.motion_min_px:
            info["note"] = f"too little motion ({spread:.2f} px rms) to tell dust from solar features"
            return mask, objects, info
        reach = int(math.ceil(2 * np.abs(shifts).max())) + pad
        kept_objects = []
        keep = np.zeros(labels.max() + 1, bool)
        for ob, (by0, bx0, by1, bx1) in zip(objects, boxes):
            ya, yb = max(by0 - reach, 0), min(by1 + reach, h)
            xa, xb = max(bx0 - reach, 0), min(bx1 + reach, w)
            stack = np.stack([f[ya:yb, xa:xb] * s for f, s in zip(frames_kept, scales)])
            ref_p = np.median(stack, axis=0)
            support = ndimage.binary_dilation(cores[ya:yb, xa:xb] == ob["_lab"], iterations=3)
            coupling = _sun_coupling(stack, ref_p, shifts, support,
                                     max(1.0, 0.15 * float(ob["diameter"])))
            ob["sun_coupling"] = [round(c, 3) for c in coupling]
            if min(coupling) > self.max_sun_coupling:
                rejected["moves_with_sun"] = rejected.get("moves_with_sun", 0) + 1
                continue
            keep[ob["_lab"]] = True
            kept_objects.append(ob)
        for k, ob in enumerate(kept_objects, start=1):
            ob["label"] = k
        info.update(used=True, n_tested=len(objects), n_rejected=len(objects) - len(kept_objects))
        return keep[labels], kept_objects, info

    def _split(self, obj: np.ndarray, d1: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Split touching shadows: one object per core (part deeper than a quarter of its peak).

        Returns ``(labels, cores, n)``: every pixel of *obj* goes to its nearest
        core, so a deep spot touching a faint ring or a texture dip is judged on
        its own.
        """
        parents, n_p = ndimage.label(obj, structure=_EIGHT)
        if n_p == 0:
            return parents, parents, 0
        peak = np.zeros(n_p + 1, np.float32)
        peak[1:] = ndimage.maximum(d1, parents, index=np.arange(1, n_p + 1))
        cores, n = ndimage.label(obj & (d1 >= 0.25 * peak[parents]), structure=_EIGHT)
        idx = ndimage.distance_transform_edt(cores == 0, return_distances=False, return_indices=True)
        labels = np.where(obj, cores[idx[0], idx[1]], 0)
        return labels, cores, n

    def _select(self, obj, d_raw, dsm, nsig, sky, rejected):
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
            if reason:
                rejected[reason] = rejected.get(reason, 0) + 1
                continue
            keep[lab] = True
            objects.append({
                "label": len(objects) + 1, "_lab": lab,
                "y": round(float(ys.mean() + sl[0].start), 2),
                "x": round(float(xs.mean() + sl[1].start), 2),
                "area": area, "diameter": round(diam, 2), "core_diameter": round(core_diam, 2),
                "depth": round(depth, 4), "significance": round(z, 2),
                "elongation": round(elong, 2),
                "bbox": [int(sl[0].start), int(sl[1].start), int(sl[0].stop), int(sl[1].stop)],
            })
        kept = keep[labels]
        return kept, objects, np.where(kept, labels, 0), np.where(keep[cores], cores, 0)


# --------------------------------------------------------------------------- motion
def _frame_source(frames: Any):
    """``(n_frames, get)`` for a SerReader-like object, an array ``(n, H, W)`` or a list.

    ``get(i)`` returns frame *i* as float32 ``(H, W)``: RGB averaged, a Bayer
    or CMY mosaic balanced like the reference (:func:`~aiflat_local.reference.balance_cfa`).
    """
    header = getattr(frames, "header", None)
    color_id = int(getattr(header, "color_id", 0) or 0)
    if hasattr(frames, "frame"):
        n = int(getattr(frames, "n_frames", None) or len(frames))
        fetch = frames.frame
    else:
        n = len(frames)
        fetch = frames.__getitem__

    def get(i: int) -> np.ndarray:
        f = np.asarray(fetch(i), dtype=np.float32)
        if f.ndim == 3:
            f = f.mean(axis=2)
        if color_id in (8, 9, 10, 11, 16, 17, 18, 19):
            from ..reference import balance_cfa
            f = balance_cfa(f, color_id)
        return f

    return n, get


def _bandpass(img: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """Relative band-pass (Gaussian 1.5 px over 8 px, minus 1), *exclude* zeroed, Hann-tapered.

    The lower cut matters: a frame's pixel noise is partly inside the median
    of the frames, which would pull a whitened correlation towards zero shift.
    """
    num = ndimage.gaussian_filter(img, 1.5)
    den = ndimage.gaussian_filter(img, 8.0)
    bp = np.clip(num / np.maximum(den, 1e-12) - 1.0, -0.5, 0.5)
    bp[exclude] = 0.0
    wy = np.hanning(img.shape[0])[:, None]
    wx = np.hanning(img.shape[1])[None, :]
    return (bp * wy * wx).astype(np.float32)


def _xcorr_shift(ref_f: np.ndarray, img_bp: np.ndarray, max_shift: int) -> tuple[float, float]:
    """Sub-pixel ``(dy, dx)`` such that ``img(x) ~ ref(x - d)``, by cross-correlation."""
    corr = np.fft.irfft2(np.fft.rfft2(img_bp) * np.conj(ref_f), s=img_bp.shape)
    corr = np.fft.fftshift(corr)
    cy, cx = corr.shape[0] // 2, corr.shape[1] // 2
    win = corr[cy - max_shift: cy + max_shift + 1, cx - max_shift: cx + max_shift + 1]
    py, px = np.unravel_index(int(np.argmax(win)), win.shape)

    def parabola(a, b, c):
        den = a - 2 * b + c
        return 0.0 if den >= 0 else 0.5 * (a - c) / den

    dy = dx = 0.0
    if 0 < py < win.shape[0] - 1:
        dy = parabola(win[py - 1, px], win[py, px], win[py + 1, px])
    if 0 < px < win.shape[1] - 1:
        dx = parabola(win[py, px - 1], win[py, px], win[py, px + 1])
    return py - max_shift + dy, px - max_shift + dx


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
    # cubic-spline coefficients once; each frame's shift then costs one pass
    ref_c = ndimage.spline_filter(ref, order=3, mode="nearest")
    smooth_c = ndimage.spline_filter(smooth, order=3, mode="nearest")
    num = den = 0.0
    gram = np.zeros((2, 2))
    rhs = np.zeros(2)
    for frame, (dy, dx) in zip(stack, shifts):
        diff = (frame - ref)[support]
        whole = (ndimage.shift(ref_c, (dy, dx), order=3, mode="nearest", prefilter=False)
                 - ref)[support]
        part = (ndimage.shift(smooth_c, (dy, dx), order=3, mode="nearest", prefilter=False)
                - smooth)[support]
        num += float(diff @ whole)
        den += float(whole @ whole)
        parts = np.stack([part, whole - part], axis=1)
        gram += parts.T @ parts
        rhs += parts.T @ diff
    whole_c = num / max(den, 1e-12)
    try:
        shape_c = float(np.linalg.solve(gram + 1e-12 * np.eye(2), rhs)[0])
    except np.linalg.LinAlgError:
        shape_c = whole_c
    return float(whole_c), shape_c


def _hysteresis(seeds: np.ndarray, grow: np.ndarray) -> np.ndarray:
    """Connected components (8-connected) of *grow* that contain a seed."""
    labels, n = ndimage.label(grow | seeds, structure=_EIGHT)
    if n == 0:
        return np.zeros(grow.shape, bool)
    hit = np.zeros(n + 1, bool)
    hit[np.unique(labels[seeds])] = True
    hit[0] = False
    return hit[labels]

"""The deterministic flat builder: the "hand" that turns a dust mask into a flat.

Rules (see DESIGN.md, "The flat builder's rules")
--------------------------------------------------
- A flat is a per-pixel gain, float32, **1.0 = no attenuation**; calibration
  divides every frame by it.
- Outside the soft mask (weight 0) the flat is exactly 1.0, bit for bit.
- Inside, ``flat = (1 - w) + w * gain`` where ``w`` is the soft mask and
  ``gain`` the estimated attenuation: ``reference / inpainted`` for one image
  (after matching the inpainted image's brightness to the reference on
  unmasked pixels), or a gain solved from the video's motion.
- No blind clipping at 1.0 (a dust shadow's bright diffraction rim is a real
  gain > 1): the gain is bounded to ``[min_gain, max_gain]`` and the number of
  pixels that hit each bound is reported.
- Every division is guarded (zero, negative, NaN, saturated) and counted.
- The soft mask is the detected mask expanded by a disk (default 10 px) and
  feathered with a Gaussian (default sigma 3 px), as the original tool does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class FlatParams:
    """Parameters of :func:`build_flat` (all recorded in the provenance).

    Attributes
    ----------
    expand_px : float
        Radius of the disk the dust mask is expanded by, in pixels.
    sigma_px : float
        Gaussian feathering of the expanded mask, in pixels (0 = hard edge).
    weight_floor : float
        Soft-mask weights below this are set to exactly 0, so the Gaussian's far
        tail does not touch pixels with weights of 1e-12 (the flat is exactly 1.0 there).
    min_gain, max_gain : float
        Bounds of a sane gain; pixels beyond are set to the bound and counted.
    match_brightness : bool
        Fit ``reference ~ a * inpainted + b`` on unmasked pixels and apply it to
        the inpainted image before taking the ratio (undoes global level shifts).
    saturation : float or None
        Reference values at or above this are saturated: their gain is unknown
        and set to 1.0 (counted as guarded).
    """

    expand_px: float = 10.0
    sigma_px: float = 3.0
    weight_floor: float = 1e-3
    min_gain: float = 0.05
    max_gain: float = 2.0
    match_brightness: bool = True
    saturation: float | None = None

    def __post_init__(self) -> None:
        if self.expand_px < 0 or self.sigma_px < 0:
            raise ValueError("expand_px and sigma_px must be >= 0")
        if not 0 < self.min_gain < 1 < self.max_gain:
            raise ValueError("need 0 < min_gain < 1 < max_gain")
        if not 0 <= self.weight_floor < 1:
            raise ValueError("weight_floor must be in [0, 1)")


@dataclass
class FlatResult:
    """A flat and what went into it.

    Attributes
    ----------
    flat : numpy.ndarray
        float32 ``(H, W)``, 1.0 = no attenuation; exactly 1.0 where ``soft_mask == 0``.
    soft_mask : numpy.ndarray
        float32 ``(H, W)`` in [0, 1]: the weight ``w`` used.
    gain : numpy.ndarray
        float32 ``(H, W)``: the bounded, guarded gain estimate (1.0 where ``w == 0``).
    stats : dict
        Counts and fitted numbers (JSON-friendly).
    """

    flat: np.ndarray
    soft_mask: np.ndarray
    gain: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def disk(radius: float) -> np.ndarray:
    """Boolean disk structuring element of the given radius (pixels)."""
    r = int(np.floor(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return yy * yy + xx * xx <= radius * radius


def expand_mask(dust_mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilate a boolean mask by a disk of *radius* px (Euclidean, exact, any radius)."""
    dust_mask = np.asarray(dust_mask, dtype=bool)
    if radius <= 0 or not dust_mask.any():
        return dust_mask.copy()
    # Distance to the nearest mask pixel, computed only in the mask's bounding box
    # grown by the radius (cheap for sparse masks on large images).
    pad = int(np.ceil(radius)) + 1
    rows, cols = np.nonzero(dust_mask.any(axis=1))[0], np.nonzero(dust_mask.any(axis=0))[0]
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, dust_mask.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, dust_mask.shape[1])
    out = np.zeros_like(dust_mask)
    dist = ndimage.distance_transform_edt(~dust_mask[r0:r1, c0:c1])
    out[r0:r1, c0:c1] = dist <= radius
    return out


def soft_mask(dust_mask: np.ndarray, expand_px: float = 10.0, sigma_px: float = 3.0,
              weight_floor: float = 1e-3) -> np.ndarray:
    """Expanded, feathered weight in [0, 1] (float32); 1 on every detected dust pixel.

    The detected mask is dilated by a disk of ``expand_px``, blurred with a
    Gaussian of ``sigma_px`` (truncated at 4 sigma), weights below
    ``weight_floor`` are set to 0, and the detected pixels are forced to 1.
    """
    dust_mask = np.asarray(dust_mask, dtype=bool)
    expanded = expand_mask(dust_mask, expand_px)
    if sigma_px > 0:
        w = ndimage.gaussian_filter(expanded.astype(np.float64), sigma_px, mode="nearest", truncate=4.0)
    else:
        w = expanded.astype(np.float64)
    w[w < weight_floor] = 0.0
    np.minimum(w, 1.0, out=w)
    w[dust_mask] = 1.0
    return w.astype(np.float32)


def match_brightness(inpainted: np.ndarray, reference: np.ndarray, clean: np.ndarray,
                     max_samples: int = 200_000) -> tuple[np.ndarray, dict[str, float]]:
    """Map *inpainted* onto the reference's brightness scale using clean pixels.

    Fits ``reference ~ a * inpainted + b`` by least squares on the pixels in
    *clean* (boolean), with one round of 3-sigma outlier rejection, and returns
    ``(a * inpainted + b, {"a", "b", "n"})``. When the inpainted image already
    equals the reference on the clean pixels (any deterministic inpainter), it is
    returned unchanged with ``a = 1, b = 0``.
    """
    ref = reference[clean].astype(np.float64)
    inp = inpainted[clean].astype(np.float64)
    ok = np.isfinite(ref) & np.isfinite(inp)
    ref, inp = ref[ok], inp[ok]
    if ref.size == 0 or np.array_equal(ref, inp):
        return inpainted, {"a": 1.0, "b": 0.0, "n": int(ref.size), "identity": True}
    if ref.size > max_samples:
        idx = np.linspace(0, ref.size - 1, max_samples).astype(np.int64)
        ref, inp = ref[idx], inp[idx]
    a, b = 1.0, 0.0
    keep = np.ones(ref.size, dtype=bool)
    for _ in range(2):
        if np.ptp(inp[keep]) > 0:
            a, b = np.polyfit(inp[keep], ref[keep], 1)
        else:
            a, b = 1.0, float(np.mean(ref[keep] - inp[keep]))
        resid = ref - (a * inp + b)
        scale = 1.4826 * np.median(np.abs(resid - np.median(resid)))
        if scale == 0:
            break
        keep = np.abs(resid) <= 3 * scale
    matched = (a * inpainted.astype(np.float64) + b).astype(np.float32)
    return matched, {"a": float(a), "b": float(b), "n": int(keep.sum()), "identity": False}


def ratio_gain(reference: np.ndarray, estimate: np.ndarray, where: np.ndarray,
               saturation: float | None = None) -> tuple[np.ndarray, int]:
    """``reference / estimate`` on *where*, 1.0 elsewhere; returns ``(gain, n_guarded)``.

    Guarded (gain set to 1.0 and counted): estimate <= 0, any non-finite value,
    a reference <= 0 or at/above ``saturation``.
    """
    gain = np.ones(reference.shape, dtype=np.float64)
    ref = reference[where].astype(np.float64)
    est = estimate[where].astype(np.float64)
    bad = ~np.isfinite(ref) | ~np.isfinite(est) | (est <= 0) | (ref <= 0)
    if saturation is not None:
        bad |= ref >= saturation
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(bad, 1.0, ref / np.where(bad, 1.0, est))
    gain[where] = g
    return gain, int(bad.sum())


def build_flat(
    reference: np.ndarray,
    dust_mask: np.ndarray,
    *,
    inpainted: np.ndarray | None = None,
    gain: np.ndarray | None = None,
    params: FlatParams = FlatParams(),
    weight: np.ndarray | None = None,
) -> FlatResult:
    """Build the flat from a reference and a detected dust mask.

    Parameters
    ----------
    reference : (H, W) array
        The reference image (temporal median), any positive units.
    dust_mask : (H, W) bool array
        The detected dust (True = dust), before expansion.
    inpainted : (H, W) array, optional
        The reference with the dust filled in (over at least the soft mask's
        support, see :func:`inpaint_region`). The gain is ``reference / inpainted``.
    gain : (H, W) array, optional
        A gain estimated some other way (e.g. from motion); used instead of the ratio.
    params : FlatParams
    weight : (H, W) array in [0, 1], optional
        The soft mask computed elsewhere (e.g. the motion route's
        :func:`aiflat_local.motion.motion_soft_mask`) instead of the detected
        mask expanded by ``params.expand_px`` and feathered by
        ``params.sigma_px``. Weights below ``params.weight_floor`` still become
        exactly 0 (the flat is exactly 1.0 there) and the detected pixels 1.

    Returns
    -------
    FlatResult
    """
    reference = np.asarray(reference, dtype=np.float32)
    dust_mask = np.asarray(dust_mask, dtype=bool)
    if reference.ndim != 2:
        raise ValueError(f"reference must be 2-D, got shape {reference.shape}")
    if dust_mask.shape != reference.shape:
        raise ValueError(f"mask shape {dust_mask.shape} != reference shape {reference.shape}")
    if (inpainted is None) == (gain is None):
        raise ValueError("give exactly one of inpainted= or gain=")

    stats: dict[str, Any] = {"params": asdict(params)}
    if weight is None:
        w = soft_mask(dust_mask, params.expand_px, params.sigma_px, params.weight_floor)
    else:
        w = np.asarray(weight, dtype=np.float64)
        if w.shape != reference.shape:
            raise ValueError(f"weight shape {w.shape} != reference shape {reference.shape}")
        if not np.isfinite(w).all():
            raise ValueError("weight must be finite")
        w = np.clip(w, 0.0, 1.0)
        w[w < params.weight_floor] = 0.0
        w[dust_mask] = 1.0
        w = w.astype(np.float32)
        stats["soft_mask"] = "given"
    inside = w > 0

    if inpainted is not None:
        inpainted = np.asarray(inpainted, dtype=np.float32)
        if inpainted.shape != reference.shape:
            raise ValueError(f"inpainted shape {inpainted.shape} != reference shape {reference.shape}")
        if params.match_brightness:
            inpainted, stats["brightness_match"] = match_brightness(inpainted, reference, ~inside)
        raw_gain, n_guarded = ratio_gain(reference, inpainted, inside, params.saturation)
        stats["gain_source"] = "reference/inpainted"
    else:
        raw_gain = np.asarray(gain, dtype=np.float64)
        if raw_gain.shape != reference.shape:
            raise ValueError(f"gain shape {raw_gain.shape} != reference shape {reference.shape}")
        bad = inside & ~np.isfinite(raw_gain) | inside & (raw_gain <= 0)
        raw_gain = np.where(bad, 1.0, raw_gain)
        n_guarded = int(bad.sum())
        stats["gain_source"] = "given"

    g = raw_gain[inside]
    n_low = int(np.count_nonzero(g < params.min_gain))
    n_high = int(np.count_nonzero(g > params.max_gain))
    g = np.clip(g, params.min_gain, params.max_gain)
    bounded_gain = np.ones(reference.shape, dtype=np.float32)
    bounded_gain[inside] = g

    flat = np.ones(reference.shape, dtype=np.float32)
    wi = w[inside].astype(np.float64)
    flat[inside] = ((1.0 - wi) + wi * g).astype(np.float32)

    n_pixels = flat.size
    stats.update(
        n_pixels=n_pixels,
        n_dust_pixels=int(dust_mask.sum()),
        n_soft_pixels=int(inside.sum()),
        fraction_exactly_one=float(np.count_nonzero(flat == 1.0) / n_pixels),
        n_guarded=n_guarded,
        n_bounded_low=n_low,
        n_bounded_high=n_high,
        flat_min=float(flat.min()),
        flat_max=float(flat.max()),
    )
    return FlatResult(flat=flat, soft_mask=w, gain=bounded_gain, stats=stats)


def inpaint_region(dust_mask: np.ndarray, params: FlatParams = FlatParams()) -> np.ndarray:
    """The pixels an inpainter must fill for :func:`build_flat`: the soft mask's support.

    Filling the expanded region (not just the detected pixels) puts the
    interpolation boundary on clean pixels beyond the faint wings of each shadow.
    """
    return soft_mask(dust_mask, params.expand_px, params.sigma_px, params.weight_floor) > 0


def read_flat(path, unity: float | None = None) -> tuple[np.ndarray, float]:
    """Read a flat file and return it scaled so that 1.0 = no attenuation, with the unity used.

    The unity (the stored value that means "no change") is, in order: the
    *unity* argument; a ``UNITY`` keyword (our FITS/XISF files) or ``unity = X``
    in a TIFF description (our flat.tif); 65535 for uint16 and 255 for uint8
    data; 1.0 for float data.
    """
    from .errors import InputError
    from .io import read_image

    flat, info = read_image(path)
    if flat.ndim != 2:
        raise InputError(f"{path}: a flat must be a single-channel image")
    if unity is None:
        recorded = info.header.get("UNITY")
        if recorded is None and "description" in info.header:
            text = str(info.header["description"])
            if "unity = " in text:
                recorded = text.split("unity = ", 1)[1].split(";")[0]
        if recorded is not None:
            unity = float(recorded)
        elif info.integer_max is not None:
            unity = info.integer_max
        else:
            unity = 1.0
    if not unity > 0:
        raise InputError(f"{path}: flat unity must be positive, got {unity}")
    return (flat / np.float32(unity)).astype(np.float32), float(unity)

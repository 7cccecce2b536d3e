"""Numpy side of the diffusion inpainter: windows, brightness mapping, compositing, ensembles.

Nothing here imports torch: every function is exact, deterministic and tested
on its own.

Coordinates are ``(row, column)`` in the image's sensor orientation; a window
is a ``(height, width)`` rectangle of the image, possibly reaching past the
image border (the outside is read by mirror reflection), that the model sees
at ``model_shape`` pixels (``factor`` x ``factor`` image pixels per model pixel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- brightness mapping
@dataclass(frozen=True)
class BrightnessMap:
    """Affine map between image brightness and the model's range ``[-1, 1]``.

    ``x = (v - offset) * scale`` and back ``v = x / scale + offset``, computed
    in float64, with ``offset`` a float32 value and ``scale`` a power of two.
    So ``inverse(forward(v)) == v`` bit for bit for every float32 ``v`` whose
    difference from ``offset`` float64 holds exactly (any ``v`` within a factor
    of about 2**29 of ``offset``, zero included: all 8/16-bit data and any
    realistic float image).

    Attributes
    ----------
    offset : float
        Image brightness mapped to 0 (the middle of the model's range).
    scale : float
        Model units per image unit (a power of two).
    """

    offset: float
    scale: float

    @classmethod
    def from_context(cls, values: np.ndarray, headroom: float = 0.8) -> "BrightnessMap":
        """The map that puts *values* (clean context pixels) inside ``[-headroom, headroom]``.

        The range of *values* lands between ``headroom / 2`` and ``headroom``
        on each side of 0 (the scale is rounded down to a power of two), so the
        model can paint somewhat brighter or darker than the context before its
        output is clamped at +-1.
        """
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return cls(0.0, 1.0)
        lo, hi = float(v.min()), float(v.max())
        offset = float(np.float32(0.5 * (lo + hi)))
        half = max(hi - offset, offset - lo)
        if not half > 0:
            half = abs(offset) if offset != 0 else 1.0
        scale = 2.0 ** math.floor(math.log2(headroom / half))
        return cls(offset, float(scale))

    def forward(self, v: np.ndarray) -> np.ndarray:
        """Image brightness -> model units (float64)."""
        return (np.asarray(v, dtype=np.float64) - self.offset) * self.scale

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Model units -> image brightness (float32), the exact inverse of :meth:`forward`."""
        return (np.asarray(x, dtype=np.float64) / self.scale + self.offset).astype(np.float32)


def gray_to_model_rgb(x: np.ndarray) -> np.ndarray:
    """Model-unit gray ``(..., H, W)`` in [-1, 1] -> float32 RGB ``(..., H, W, 3)`` in [0, 1].

    The ``[0, 1]`` convention is what diffusers' image processors expect for
    numpy input (they map it to ``[-1, 1]`` themselves).
    """
    y = ((np.asarray(x, dtype=np.float64) + 1.0) * 0.5).astype(np.float32)
    return np.repeat(y[..., None], 3, axis=-1)


def model_rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """float RGB ``(..., H, W, 3)`` in [0, 1] -> model-unit gray (float64) in [-1, 1].

    The channel mean, computed in float64: for float32 input with three equal
    channels it returns exactly ``2 * channel - 1``, so gray -> RGB -> gray is
    the identity on float32 values.
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    return (rgb[..., 0] + rgb[..., 1] + rgb[..., 2]) / 3.0 * 2.0 - 1.0


# --------------------------------------------------------------------------- windows
@dataclass
class Window:
    """One crop the model sees.

    Attributes
    ----------
    y, x : int
        Image coordinates of the window's top-left pixel (negative or past the
        image when the window is larger than the image: mirror-padded).
    height, width : int
        Window size in image pixels (``factor * model_shape``).
    factor : int
        Image pixels per model pixel along each axis (1 = full resolution;
        larger only for a region too big for one model-sized window).
    key : int
        Id of the region the window was placed for (its anchor); seeds derive from it.
    regions : list of int
        Region ids whose fill is taken from this window.
    """

    y: int
    x: int
    height: int
    width: int
    factor: int
    key: int
    regions: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"y": self.y, "x": self.x, "height": self.height, "width": self.width,
                "factor": self.factor, "key": self.key, "regions": list(self.regions)}


@dataclass
class WindowPlan:
    """Regions of a mask and the windows that cover them.

    Attributes
    ----------
    labels : numpy.ndarray
        int32 ``(H, W)``, 0 = not masked, ``1..n`` = region id (8-connected
        components in raster order of their first pixel).
    boxes : list of tuple of slice
        Bounding box of each region (index ``id - 1``).
    windows : list of Window
    model_shape : tuple of int
        ``(height, width)`` the model runs at, multiples of 8.
    region_window : dict
        Region id -> index into ``windows``.
    """

    labels: np.ndarray
    boxes: list[tuple[slice, slice]]
    windows: list[Window]
    model_shape: tuple[int, int]
    region_window: dict[int, int]

    @property
    def n_regions(self) -> int:
        return len(self.boxes)


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of *multiple* that is >= *n*."""
    return -(-int(n) // multiple) * multiple


def model_shape_for(image_shape: tuple[int, int], crop_size: int) -> tuple[int, int]:
    """Model input shape: *crop_size* square, shrunk to the image (rounded up to 8) when smaller."""
    if crop_size % 8 or crop_size < 8:
        raise ValueError(f"crop size must be a positive multiple of 8, got {crop_size}")
    return (min(crop_size, round_up(image_shape[0], 8)), min(crop_size, round_up(image_shape[1], 8)))


def _place(lo: int, hi: int, size: int, n: int, centre: bool) -> int:
    """Start of a window of *size* along an axis of length *n* that contains ``[lo, hi)``."""
    if size >= n:
        return -((size - n) // 2)
    start = lo - (size - (hi - lo)) // 2 if centre else lo
    return int(min(max(start, 0), n - size))


def _best_start(lo: np.ndarray, hi: np.ndarray, size: int, first: int, last: int, default: int) -> int:
    """Start in ``[first, last]`` of a window of *size* holding the most spans ``[lo, hi)``.

    Candidates are the range ends, *default* and every span's left edge or
    right-aligned start inside the range; ties go to the candidate nearest *default*.
    """
    cands = np.concatenate([[first, last, default], lo, hi - size])
    cands = np.unique(cands[(cands >= first) & (cands <= last)])
    counts = ((lo[None, :] >= cands[:, None]) & (hi[None, :] <= cands[:, None] + size)).sum(axis=1)
    best = cands[counts == counts.max()]
    return int(best[np.argmin(np.abs(best - default))])


def plan_windows(mask: np.ndarray, crop_size: int, context_px: int) -> WindowPlan:
    """Cover every masked region, with *context_px* of context, by model-sized windows.

    Regions are the 8-connected components of *mask*. Greedy cover, in
    raster order of the regions' context boxes: the first uncovered region
    gets a window (its context box at the window's top, shifted across to
    hold as many other uncovered regions as possible), and every other
    uncovered region whose whole context box lies inside that window is
    assigned to it too. So a sparse scatter of small spots costs
    about one window per ``crop_size``-square of image that holds dust,
    whatever their number. A region whose context box is larger than one
    window gets a window ``factor`` times larger (the smallest integer that
    fits), which the model sees block-averaged by ``factor``.

    Parameters
    ----------
    mask : (H, W) bool array
        True = fill.
    crop_size : int
        Model resolution (multiple of 8), e.g. 512 for SD 1.5, 1024 for SDXL.
    context_px : int
        Minimum clean margin around each region inside its window (less only
        at the image border).
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    sy, sx = model_shape_for(mask.shape, crop_size)
    labels, n = ndimage.label(mask, structure=_EIGHT)
    labels = labels.astype(np.int32)
    boxes = ndimage.find_objects(labels)
    c = int(context_px)
    grown = np.array([[max(b[0].start - c, 0), max(b[1].start - c, 0), min(b[0].stop + c, h),
                       min(b[1].stop + c, w)] for b in boxes], dtype=np.int64).reshape(-1, 4)
    order = np.lexsort((grown[:, 1], grown[:, 0]))
    factors = np.maximum(1, np.maximum(-(-(grown[:, 2] - grown[:, 0]) // sy),
                                       -(-(grown[:, 3] - grown[:, 1]) // sx)))
    assigned = np.zeros(n, dtype=bool)
    windows: list[Window] = []
    region_window: dict[int, int] = {}
    for i in order:
        if assigned[i]:
            continue
        f = int(factors[i])
        gy0, gx0, gy1, gx1 = (int(v) for v in grown[i])
        wh, ww = f * sy, f * sx
        y0 = _place(gy0, gy1, wh, h, centre=False)
        x0 = _place(gx0, gx1, ww, w, centre=True)
        members = np.zeros(n, dtype=bool)
        members[i] = True
        if f == 1:
            free = ~assigned & (factors == 1) & (grown[:, 0] >= y0) & (grown[:, 2] <= y0 + wh)
            if ww < w:
                x0 = _best_start(grown[free, 1], grown[free, 3], ww, max(gx1 - ww, 0), min(gx0, w - ww), x0)
            members |= free & (grown[:, 1] >= x0) & (grown[:, 3] <= x0 + ww)
        assigned |= members
        ids = [int(j) + 1 for j in np.flatnonzero(members)]
        for rid in ids:
            region_window[rid] = len(windows)
        windows.append(Window(y0, x0, wh, ww, f, key=int(i) + 1, regions=ids))
    return WindowPlan(labels, list(boxes), windows, (sy, sx), region_window)


def _reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror (edge-repeating, period ``2 n``) indices into ``[0, n)``."""
    idx = np.mod(idx, 2 * n)
    return np.where(idx >= n, 2 * n - 1 - idx, idx)


def extract(a: np.ndarray, win: Window) -> np.ndarray:
    """The window's pixels of *a*; outside the image by mirror reflection."""
    h, w = a.shape
    if win.y >= 0 and win.x >= 0 and win.y + win.height <= h and win.x + win.width <= w:
        return a[win.y:win.y + win.height, win.x:win.x + win.width].copy()
    rows = _reflect_index(np.arange(win.y, win.y + win.height), h)
    cols = _reflect_index(np.arange(win.x, win.x + win.width), w)
    return a[np.ix_(rows, cols)]


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f x f`` blocks (shape divisible by *f*); identity (a copy) for ``f == 1``."""
    if f == 1:
        return np.array(a, copy=True)
    hh, ww = a.shape[0] // f, a.shape[1] // f
    return a.reshape(hh, f, ww, f).mean(axis=(1, 3))


def block_any(m: np.ndarray, f: int) -> np.ndarray:
    """True where any pixel of an ``f x f`` block is True (shape divisible by *f*)."""
    if f == 1:
        return np.array(m, dtype=bool, copy=True)
    hh, ww = m.shape[0] // f, m.shape[1] // f
    return m.reshape(hh, f, ww, f).any(axis=(1, 3))


def grid_mask(m: np.ndarray, cell: int) -> np.ndarray:
    """Grow a mask to whole ``cell x cell`` cells (the model's latent grid).

    A latent-diffusion inpainter sees the mask at ``1 / cell`` resolution; a
    dust spot smaller than a cell would otherwise vanish from its mask and be
    reproduced instead of filled. Shape must be divisible by *cell*.
    """
    if cell <= 1:
        return np.array(m, dtype=bool, copy=True)
    coarse = block_any(m, cell)
    return np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)


def upsample(a: np.ndarray, f: int) -> np.ndarray:
    """Bilinear upsampling by an integer factor (block centres aligned); identity for ``f == 1``."""
    if f == 1:
        return a
    return ndimage.zoom(a, f, order=1, grid_mode=True, mode="nearest")


@dataclass
class ModelInput:
    """One window prepared for the model.

    Attributes
    ----------
    gray : numpy.ndarray
        float64 ``model_shape`` in model units; masked pixels are 0.
    mask : numpy.ndarray
        bool ``model_shape``; True = the model paints it (grown to the latent grid).
    mapping : BrightnessMap
    """

    gray: np.ndarray
    mask: np.ndarray
    mapping: BrightnessMap


def prepare_window(image: np.ndarray, mask: np.ndarray, win: Window, cell: int,
                   fallback: BrightnessMap) -> ModelInput:
    """Crop, map to model units and downsample one window.

    Non-finite pixels count as masked (the model never sees them). The
    brightness map comes from the window's clean pixels, or *fallback* when
    the window has none.
    """
    crop = extract(image, win).astype(np.float64)
    hole = extract(mask, win) | ~np.isfinite(crop)
    clean = crop[~hole]
    mapping = BrightnessMap.from_context(clean) if clean.size else fallback
    x = np.where(hole, 0.0, mapping.forward(np.where(hole, mapping.offset, crop)))
    x = block_mean(x, win.factor)
    hole = grid_mask(block_any(hole, win.factor), cell)
    x[hole] = 0.0
    return ModelInput(x, hole, mapping)


def output_to_image(gray: np.ndarray, win: Window, mapping: BrightnessMap) -> np.ndarray:
    """Model-unit gray at model resolution -> image brightness over the whole window (float32)."""
    return mapping.inverse(upsample(np.asarray(gray, dtype=np.float64), win.factor))


# --------------------------------------------------------------------------- ensembles and seeds
def robust_spread(samples: np.ndarray, axis: int = 0) -> np.ndarray:
    """Robust standard deviation ``1.4826 * median(|s - median(s)|)`` along *axis* (float32)."""
    s = np.asarray(samples, dtype=np.float64)
    med = np.median(s, axis=axis, keepdims=True)
    return (1.4826 * np.median(np.abs(s - med), axis=axis)).astype(np.float32)


def ensemble_fill(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Median of ``(N, H, W)`` samples and their robust spread (None for a single sample)."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.shape[0] == 1:
        return samples[0].copy(), None
    return np.median(samples, axis=0).astype(np.float32), robust_spread(samples)


def derive_seed(seed: int, key: int, roll: int, member: int) -> int:
    """A 32-bit seed for (base seed, window key, re-roll round, ensemble member).

    Derived with numpy's ``SeedSequence`` (a hash), so nearby inputs give
    unrelated seeds and the same inputs give the same seed on every machine.
    """
    state = np.random.SeedSequence([int(seed), int(key), int(roll), int(member)]).generate_state(1)
    return int(state[0])


def region_pixels(plan: WindowPlan, rid: int, win: Window
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Image coordinates ``(rows, cols)`` of region *rid*, and the same relative to *win*."""
    sl = plan.boxes[rid - 1]
    rr, cc = np.nonzero(plan.labels[sl] == rid)
    rows, cols = rr + sl[0].start, cc + sl[1].start
    return (rows, cols), (rows - win.y, cols - win.x)

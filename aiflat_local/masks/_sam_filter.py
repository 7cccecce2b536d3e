"""Filtering and merging SAM's masks: keep compact, darker-than-surroundings blobs, one per dust shadow.

SAM segments *anything*: granules, filaments, whole tiles of background. A
mask is kept as dust only when (in this order of checks):

- ``small``: its area is at least ``min_area_px``;
- ``large``: its equivalent diameter is at most ``max_diameter_px`` and it
  covers at most ``max_window_fraction`` of the window it came from;
- ``sky``: neither it nor the ring around it reaches the sky (pixels below
  ``sky_fraction`` of the disk level), which is dark for other reasons;
- ``elongated``: major/minor axis ratio (from second moments) at most
  ``max_elongation``;
- ``not_compact``: *extent* at least ``min_extent``, where extent is its area
  over the area of the ellipse with the same second moments (1.0 for a
  filled disk or ellipse, lower for ragged, crescent or fragmented masks);
- ``not_dark``: *contrast* ``1 - mean(inside) / median(ring)`` at least
  ``min_contrast`` (a multiplicative dip: dust is darker than the Sun around
  it); the ring is ``max(2, diameter / 2)`` px wide, one pixel away;
- ``too_dark``: not deeper than a dust shadow of its size can be
  (:func:`aiflat_local.masks.classical.plausible_depth`: sunspots and pores).

Holes are filled first (a donut shadow is one object) and only one
8-connected component is kept: the one under the prompt point, or the
largest. Merging is greedy by rank (model masks by score, then the
proposer's own masks): a mask overlapping a kept one with IoU >=
``merge_iou``, or lying inside it for ``merge_contain`` of its area, is
a duplicate and dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .classical import plausible_depth

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(eq=False)
class ObjectMask:
    """One object mask in image coordinates, stored as its tight bounding-box crop.

    Attributes
    ----------
    mask : numpy.ndarray
        bool crop; ``mask[r, c]`` is image pixel ``(y0 + r, x0 + c)``.
    y0, x0 : int
        Crop corner in the image.
    score : float
        The model's score (NaN for the proposer's own masks).
    source : str
        ``points``, ``boxes``, ``grid``, ``text`` or ``proposer``.
    candidate : int or None
        Index of the proposer candidate that prompted it.
    prompt : str or None
        The text prompt (SAM 3).
    stats : dict
        Filled by :func:`measure`.
    """

    mask: np.ndarray
    y0: int
    x0: int
    score: float = float("nan")
    source: str = "points"
    candidate: int | None = None
    prompt: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mask(cls, mask: np.ndarray, offset: tuple[int, int] = (0, 0), **kw: Any) -> "ObjectMask | None":
        """Tight crop of a boolean *mask* whose corner is at *offset* in the image (None if empty)."""
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            return None
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        return cls(np.ascontiguousarray(mask[y0:y1, x0:x1]), int(y0 + offset[0]), int(x0 + offset[1]), **kw)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return self.y0, self.x0, self.y0 + self.mask.shape[0], self.x0 + self.mask.shape[1]

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def centroid(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(ys.mean() + self.y0), float(xs.mean() + self.x0)


@dataclass
class FilterParams:
    """Thresholds of :func:`reject_reason` (see the module documentation)."""

    min_area_px: int = 5
    max_diameter_px: float = 160.0
    max_window_fraction: float = 0.25
    max_elongation: float = 2.5
    min_extent: float = 0.6
    min_contrast: float = 0.01
    max_particle_px: float = 12.0
    max_dust_depth: float = 0.75
    sky_fraction: float = 0.15


def tight(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]] | None:
    """``(crop, (row, col) of its corner)`` of the bounding box of a boolean mask; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return mask[r0:r1, c0:c1], (int(r0), int(c0))


def component(mask: np.ndarray, point: tuple[float, float] | None = None) -> np.ndarray:
    """Holes filled, then the 8-connected component under *point* ``(row, col)`` (or nearest it), or the largest."""
    filled = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(filled, structure=_EIGHT)
    if n <= 1:
        return filled
    if point is not None:
        r = int(min(max(math.floor(point[0]), 0), mask.shape[0] - 1))
        c = int(min(max(math.floor(point[1]), 0), mask.shape[1] - 1))
        lab = labels[r, c]
        if lab == 0:
            idx = ndimage.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
            lab = labels[idx[0][r, c], idx[1][r, c]]
        return labels == lab
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def shape_stats(mask: np.ndarray) -> tuple[float, float, float]:
    """``(elongation, extent, diameter)`` of a filled mask (second moments; pixel variance 1/12 added)."""
    ys, xs = np.nonzero(mask)
    area = ys.size
    diam = 2.0 * math.sqrt(area / math.pi)
    if area < 2:
        return 1.0, 1.0, diam
    cov = np.cov(np.vstack([ys, xs]).astype(np.float64)) + np.eye(2) / 12.0
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    major, minor = 4 * math.sqrt(max(ev[0], 1e-12)), 4 * math.sqrt(max(ev[1], 1e-12))
    return major / minor, area / (math.pi / 4 * major * minor), diam


def measure(obj: ObjectMask, image: np.ndarray, sky_level: float) -> dict[str, Any]:
    """Shape and photometry of *obj* on *image*; stored in ``obj.stats`` and returned.

    Keys: ``area``, ``diameter``, ``elongation``, ``extent``, ``contrast``
    (``1 - mean inside / median ring``), ``depth`` (``1 - min of the
    0.7 px-smoothed image inside / median ring``), ``y``, ``x`` (centroid),
    ``sky`` (the object or its ring reaches pixels below *sky_level*).
    """
    elong, extent, diam = shape_stats(obj.mask)
    ring_px = max(2, int(math.ceil(0.5 * diam)))
    pad = ring_px + 2
    h, w = image.shape
    y0, x0, y1, x1 = obj.bbox
    sy0, sx0, sy1, sx1 = max(0, y0 - pad), max(0, x0 - pad), min(h, y1 + pad), min(w, x1 + pad)
    sub = image[sy0:sy1, sx0:sx1]
    inside = np.zeros(sub.shape, bool)
    inside[y0 - sy0:y1 - sy0, x0 - sx0:x1 - sx0] = obj.mask
    near = ndimage.binary_dilation(inside, structure=_EIGHT, iterations=1)
    ring = ndimage.binary_dilation(inside, structure=_EIGHT, iterations=1 + ring_px) & ~near
    if not ring.any():
        ring = ~inside
    bg = float(np.median(sub[ring])) if ring.any() else float("nan")
    inner = float(sub[inside].mean())
    smooth = ndimage.gaussian_filter(sub, 0.7)
    cy, cx = obj.centroid()
    stats = {
        "area": obj.area, "diameter": round(diam, 2), "elongation": round(elong, 3), "extent": round(extent, 3),
        "contrast": round(1.0 - inner / bg, 5) if bg > 0 else float("nan"),
        "depth": round(1.0 - float(smooth[inside].min()) / bg, 5) if bg > 0 else float("nan"),
        "y": round(cy, 2), "x": round(cx, 2),
        "sky": bool((sub[inside | ring] < sky_level).any()),
    }
    obj.stats = stats
    return stats


def reject_reason(stats: dict[str, Any], p: FilterParams, window_area: int | None = None) -> str | None:
    """Why a measured mask is not dust (a reason name of the module documentation), or None."""
    if stats["area"] < p.min_area_px:
        return "small"
    if stats["diameter"] > p.max_diameter_px or (
            window_area is not None and stats["area"] > p.max_window_fraction * window_area):
        return "large"
    if stats["sky"]:
        return "sky"
    if stats["elongation"] > p.max_elongation:
        return "elongated"
    if stats["extent"] < p.min_extent:
        return "not_compact"
    if not stats["contrast"] >= p.min_contrast:  # NaN fails too
        return "not_dark"
    if stats["depth"] > plausible_depth(stats["diameter"], p.max_particle_px, p.max_dust_depth):
        return "too_dark"
    return None


def overlap(a: ObjectMask, b: ObjectMask) -> int:
    """Number of image pixels in both masks."""
    ay0, ax0, ay1, ax1 = a.bbox
    by0, bx0, by1, bx1 = b.bbox
    y0, x0, y1, x1 = max(ay0, by0), max(ax0, bx0), min(ay1, by1), min(ax1, bx1)
    if y0 >= y1 or x0 >= x1:
        return 0
    pa = a.mask[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
    pb = b.mask[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    return int(np.count_nonzero(pa & pb))


def rank_key(obj: ObjectMask) -> tuple:
    """Model masks first, by descending score, then larger first; the proposer's masks last."""
    model = obj.source != "proposer"
    score = obj.score if obj.score == obj.score else -1.0
    return (0 if model else 1, -score, -obj.area, obj.y0, obj.x0)


def merge(objects: list[ObjectMask], *, iou: float = 0.5, contain: float = 0.8) -> tuple[list[ObjectMask], int]:
    """Greedy duplicate removal (see the module documentation) -> (kept in rank order, number dropped)."""
    kept: list[ObjectMask] = []
    dropped = 0
    for obj in sorted(objects, key=rank_key):
        dup = False
        for k in kept:
            inter = overlap(obj, k)
            if inter == 0:
                continue
            union = obj.area + k.area - inter
            if inter / union >= iou or inter / min(obj.area, k.area) >= contain:
                dup = True
                break
        if dup:
            dropped += 1
        else:
            kept.append(obj)
    return kept, dropped


def paint(shape: tuple[int, int], objects: list[ObjectMask]) -> np.ndarray:
    """Union of the objects as a boolean image of *shape*."""
    out = np.zeros(shape, bool)
    for obj in objects:
        y0, x0, y1, x1 = obj.bbox
        out[y0:y1, x0:x1] |= obj.mask
    return out

"""Prompts for SAM built from the image itself: dust candidates -> points and boxes; grids; text.

Coordinates follow :mod:`._sam_models`: continuous ``(x, y)`` where pixel
``(r, c)`` spans ``[c, c+1) x [r, r+1)``. A candidate's point is the centre of
its darkest (lightly smoothed) pixel: for a donut-shaped shadow that is on
the dark ring, not in the brighter hole, so SAM segments the shadow and the
hole is filled afterwards. Its box is the candidate's bounding box grown by
``box_margin`` (a fraction of its size, at least ``box_margin_px``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Default text prompts for SAM 3 (each one is a "concept": all its instances are returned).
TEXT_PROMPTS = ("dust spot", "dark circular shadow")
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class Candidate:
    """One dust candidate of the proposer.

    Attributes
    ----------
    index : int
        0-based, in the proposer's label order.
    point : tuple of float
        ``(x, y)`` prompt point, continuous image coordinates (pixel centre).
    bbox : tuple of int
        ``(y0, x0, y1, x1)``, end-exclusive, image pixels.
    mask : numpy.ndarray
        bool, the candidate's own pixels inside *bbox* (its proposer mask).
    """

    index: int
    point: tuple[float, float]
    bbox: tuple[int, int, int, int]
    mask: np.ndarray

    @property
    def size(self) -> int:
        """Largest side of the bounding box, px."""
        return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def diameter(self) -> float:
        return 2.0 * math.sqrt(self.area / math.pi)


def candidates_from_mask(mask: np.ndarray, image: np.ndarray, *, centers: list[tuple[float, float]] | None = None,
                         smooth_px: float = 1.0) -> list[Candidate]:
    """One :class:`Candidate` per object of a proposer's boolean *mask*.

    Objects are the 8-connected components of *mask*; when *centers*
    (``(y, x)`` of the proposer's own objects) put two or more objects in one
    component (touching shadows), the component is split between them, each
    pixel going to the nearest centre. The point is the darkest pixel of
    *image* (Gaussian *smooth_px*) inside the object; ties go to the first in
    row-major order (deterministic).
    """
    mask = np.asarray(mask, bool)
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return []
    parts = _split_by_centers(labels, n, centers or [])
    dark = ndimage.gaussian_filter(np.asarray(image, np.float32), smooth_px) if smooth_px > 0 else image
    out = []
    for i, sl in enumerate(ndimage.find_objects(parts)):
        if sl is None:
            continue
        own = parts[sl] == i + 1
        vals = np.where(own, dark[sl], np.inf)
        r, c = np.unravel_index(int(np.argmin(vals)), vals.shape)
        y, x = r + sl[0].start, c + sl[1].start
        out.append(Candidate(index=len(out), point=(x + 0.5, y + 0.5),
                             bbox=(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop), mask=own))
    return out


def _split_by_centers(labels: np.ndarray, n: int, centers: list[tuple[float, float]]) -> np.ndarray:
    """Relabel so that a component holding k >= 2 centres becomes k parts (nearest centre wins)."""
    h, w = labels.shape
    by_label: dict[int, list[tuple[float, float]]] = {}
    for cy, cx in centers:
        r, c = int(round(cy)), int(round(cx))
        if 0 <= r < h and 0 <= c < w and labels[r, c] > 0:
            by_label.setdefault(int(labels[r, c]), []).append((float(cy), float(cx)))
    if not any(len(v) > 1 for v in by_label.values()):
        return labels
    out = np.zeros_like(labels)
    nxt = 0
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        own = labels[sl] == lab
        cs = by_label.get(lab, [])
        if len(cs) < 2:
            nxt += 1
            out[sl][own] = nxt
            continue
        yy, xx = np.nonzero(own)
        yy_img, xx_img = yy + sl[0].start, xx + sl[1].start
        d2 = np.stack([(yy_img - cy) ** 2 + (xx_img - cx) ** 2 for cy, cx in cs])
        nearest = np.argmin(d2, axis=0)
        for k in range(len(cs)):
            sel = nearest == k
            if sel.any():
                nxt += 1
                out[yy_img[sel], xx_img[sel]] = nxt
    return out


def grow_box(bbox: tuple[int, int, int, int], shape: tuple[int, int], *, margin: float = 0.25,
             margin_px: int = 2) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)`` grown by ``max(margin_px, margin * side)`` on each side, clipped to *shape*."""
    y0, x0, y1, x1 = bbox
    my = max(int(margin_px), int(math.ceil(margin * (y1 - y0))))
    mx = max(int(margin_px), int(math.ceil(margin * (x1 - x0))))
    return max(0, y0 - my), max(0, x0 - mx), min(shape[0], y1 + my), min(shape[1], x1 + mx)


def point_prompts(cands: list[Candidate], offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``(n, 2)`` float ``(x, y)`` prompt points, relative to a window whose corner is *offset* ``(y0, x0)``."""
    if not cands:
        return np.zeros((0, 2), np.float64)
    pts = np.array([c.point for c in cands], dtype=np.float64)
    return pts - np.array([offset[1], offset[0]], dtype=np.float64)


def box_prompts(cands: list[Candidate], shape: tuple[int, int], offset: tuple[int, int] = (0, 0), *,
                margin: float = 0.25, margin_px: int = 2) -> np.ndarray:
    """``(n, 4)`` float ``(x0, y0, x1, y1)`` box edges (grown, clipped to *shape*), relative to *offset*."""
    if not cands:
        return np.zeros((0, 4), np.float64)
    boxes = []
    for c in cands:
        y0, x0, y1, x1 = grow_box(c.bbox, shape, margin=margin, margin_px=margin_px)
        boxes.append((x0 - offset[1], y0 - offset[0], x1 - offset[1], y1 - offset[0]))
    return np.array(boxes, dtype=np.float64)


def grid_points(height: int, width: int, per_side: int) -> np.ndarray:
    """``(per_side**2, 2)`` ``(x, y)`` points at the centres of a regular ``per_side x per_side`` grid."""
    n = max(1, int(per_side))
    xs = (np.arange(n) + 0.5) * (width / n)
    ys = (np.arange(n) + 0.5) * (height / n)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def batches(n: int, size: int):
    """``slice`` objects covering ``range(n)`` in chunks of *size*."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))

"""Windows at native resolution: overlapping tiles, crops around large candidates, seamless stitching.

Dust shadows are a few pixels wide and SAM looks at ``input_size`` (1024 or
1008) pixels, so the image is never shrunk to fit: it is cut into
overlapping ``tile_px`` tiles (a 256 px tile enlarged 4x gives SAM masks at
exactly one mask pixel per image pixel, its masks being 256 x 256).

Seams are avoided by construction: every object mask is taken *whole* from
one window.

- Prompted candidates go to the tile that owns their centre (see *core*
  below) when they fit inside it with their box margin, else to any tile
  they fit in, else to a dedicated square crop around them.
- For grid and text prompting (no candidates), a mask that touches an inner
  edge of its tile is dropped (it is cut; the neighbouring tile, which
  overlaps by ``overlap_px``, sees it whole if it is smaller than the
  overlap), and a mask is kept only by the tile whose *core* holds its centre.

The *cores* partition the image: along each axis the boundary between two
neighbouring tiles is the middle of their overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._sam_prompts import Candidate, grow_box


@dataclass(frozen=True)
class Window:
    """A rectangle of the image given to the model, end-exclusive ``(y0, x0, y1, x1)``.

    ``core`` is the part this window owns for stitching (same convention);
    ``kind`` is ``"tile"`` or ``"crop"``.
    """

    y0: int
    x0: int
    y1: int
    x1: int
    core: tuple[int, int, int, int]
    kind: str = "tile"

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def offset(self) -> tuple[int, int]:
        return self.y0, self.x0

    def contains_box(self, box: tuple[int, int, int, int]) -> bool:
        y0, x0, y1, x1 = box
        return self.y0 <= y0 and self.x0 <= x0 and y1 <= self.y1 and x1 <= self.x1

    def owns(self, y: float, x: float) -> bool:
        cy0, cx0, cy1, cx1 = self.core
        return cy0 <= y < cy1 and cx0 <= x < cx1

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def inner_edges(self, shape: tuple[int, int]) -> tuple[bool, bool, bool, bool]:
        """Which sides (top, left, bottom, right) lie inside the image (not on its border)."""
        return self.y0 > 0, self.x0 > 0, self.y1 < shape[0], self.x1 < shape[1]


def axis_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along an axis of length *n*: stride ``tile - overlap``, the last tile flush with the end."""
    if n <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, n - tile, stride))
    if not starts or starts[-1] != n - tile:
        starts.append(n - tile)
    return starts


def _cores(starts: list[int], tile: int, n: int) -> list[tuple[int, int]]:
    bounds = [0]
    for a, b in zip(starts[:-1], starts[1:]):
        end_a = min(a + tile, n)
        bounds.append((b + end_a) // 2)  # middle of the overlap
    bounds.append(n)
    return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]


def tile_grid(shape: tuple[int, int], tile_px: int, overlap_px: int) -> list[Window]:
    """Overlapping tiles covering an image of *shape*; their cores partition it exactly."""
    h, w = shape
    ty, tx = min(tile_px, h), min(tile_px, w)
    ys, xs = axis_starts(h, ty, overlap_px), axis_starts(w, tx, overlap_px)
    cys, cxs = _cores(ys, ty, h), _cores(xs, tx, w)
    return [Window(y, x, y + ty, x + tx, (cy[0], cx[0], cy[1], cx[1]))
            for y, cy in zip(ys, cys) for x, cx in zip(xs, cxs)]


def crop_around(box: tuple[int, int, int, int], shape: tuple[int, int], min_side: int) -> Window:
    """A square window (as far as the image allows) centred on *box*, side ``max(min_side, 2 x box side)``."""
    h, w = shape
    y0, x0, y1, x1 = box
    side = max(int(min_side), int(math.ceil(2 * max(y1 - y0, x1 - x0))))
    sy, sx = min(side, h), min(side, w)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    wy0 = int(min(max(0, round(cy - sy / 2)), h - sy))
    wx0 = int(min(max(0, round(cx - sx / 2)), w - sx))
    win = Window(wy0, wx0, wy0 + sy, wx0 + sx, (0, 0, h, w), "crop")
    return win


def assign_candidates(cands: list[Candidate], tiles: list[Window], shape: tuple[int, int], *,
                      margin: float, margin_px: int, crop_min_px: int) -> list[tuple[Window, list[Candidate]]]:
    """Group candidates by the window that will prompt them (see the module documentation).

    Returns ``[(window, candidates), ...]``: tiles first (in grid order, only
    those with candidates), then one crop per candidate that fits no tile.
    """
    groups: dict[int, list[Candidate]] = {}
    crops: list[tuple[Window, list[Candidate]]] = []
    for c in cands:
        box = grow_box(c.bbox, shape, margin=margin, margin_px=margin_px)
        cy, cx = (c.bbox[0] + c.bbox[2]) / 2, (c.bbox[1] + c.bbox[3]) / 2
        owner = next((i for i, t in enumerate(tiles) if t.owns(cy, cx)), None)
        if owner is not None and tiles[owner].contains_box(box):
            groups.setdefault(owner, []).append(c)
            continue
        fits = [i for i, t in enumerate(tiles) if t.contains_box(box)]
        if fits:
            best = min(fits, key=lambda i: ((tiles[i].y0 + tiles[i].y1) / 2 - cy) ** 2
                       + ((tiles[i].x0 + tiles[i].x1) / 2 - cx) ** 2)
            groups.setdefault(best, []).append(c)
            continue
        crops.append((crop_around(box, shape, crop_min_px), [c]))
    return [(tiles[i], groups[i]) for i in sorted(groups)] + crops


def touches_inner_edge(mask: np.ndarray, offset: tuple[int, int], window: Window,
                       shape: tuple[int, int]) -> bool:
    """Whether a mask (crop at *offset* in image coordinates) touches an edge of *window* inside the image."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return False
    top, left, bottom, right = window.inner_edges(shape)
    y0, y1 = ys.min() + offset[0], ys.max() + offset[0]
    x0, x1 = xs.min() + offset[1], xs.max() + offset[1]
    return bool((top and y0 <= window.y0) or (left and x0 <= window.x0)
                or (bottom and y1 >= window.y1 - 1) or (right and x1 >= window.x1 - 1))

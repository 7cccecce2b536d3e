"""Mask and flat metrics shared by tests, the ``compare`` command and benchmarks.

Pure numpy/scipy. Masks are boolean ``(H, W)`` arrays (anything else is
converted with ``!= 0``; soft masks should be thresholded by the caller).
Objects are 8-connected components. Every function returning several numbers
returns plain Python ``int``/``float`` values so the result is JSON-friendly.

Conventions for empty inputs (so that "nothing to find, nothing found" scores
as perfect agreement rather than as a division by zero):

- ``pixel_iou`` and ``dice`` of two empty masks are 1.0;
- ``coverage`` of an empty reference is 1.0;
- object recall with no reference object is 1.0, precision with no
  predicted object is 1.0, and F1 follows from those two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import InputError

_EIGHT = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- helpers
def _as_bool(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise InputError(f"{name} must be a 2-D mask, got shape {a.shape}")
    return a if a.dtype == bool else a != 0


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _as_bool(pred, "predicted mask")
    r = _as_bool(ref, "reference mask")
    if p.shape != r.shape:
        raise InputError(f"mask shapes differ: predicted {p.shape}, reference {r.shape}")
    return p, r


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element of integer *radius* (``(2r+1, 2r+1)``).

    A pixel belongs to the disk when its centre lies within *radius* pixels
    of the centre pixel (Euclidean). ``radius = 0`` gives a single pixel.
    """
    r = int(radius)
    if r < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y) <= r * r


def _near(mask: np.ndarray, tolerance_px: int) -> np.ndarray:
    """Pixels within *tolerance_px* (Euclidean, disk) of any True pixel of *mask*."""
    if tolerance_px <= 0 or not mask.any():
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=disk(tolerance_px))


def _objects(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """8-connected labels of *mask* and the label ids of objects >= *min_area* px."""
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return labels, np.zeros(0, dtype=np.int64)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(areas >= max(int(min_area), 1))
    return labels, keep[keep > 0]


def _touched(labels: np.ndarray, ids: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Boolean per id in *ids*: does object ``labels == id`` intersect *where*?"""
    if ids.size == 0:
        return np.zeros(0, dtype=bool)
    hit = np.zeros(int(labels.max()) + 1, dtype=bool)
    hit[np.unique(labels[where & (labels > 0)])] = True
    return hit[ids]


def _ratio(num: int, den: int) -> float:
    return 1.0 if den == 0 else num / den


# --------------------------------------------------------------------------- pixel metrics
def pixel_iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union of two masks; 1.0 when both are empty."""
    p, r = _pair(pred, ref)
    union = int(np.count_nonzero(p | r))
    return 1.0 if union == 0 else int(np.count_nonzero(p & r)) / union


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient ``2|P∩R| / (|P| + |R|)``; 1.0 when both are empty."""
    p, r = _pair(pred, ref)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    return 1.0 if total == 0 else 2 * int(np.count_nonzero(p & r)) / total


def coverage(pred: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of reference pixels covered by the prediction; 1.0 if *ref* is empty."""
    p, r = _pair(pred, ref)
    return _ratio(int(np.count_nonzero(p & r)), int(np.count_nonzero(r)))


# --------------------------------------------------------------------------- object metrics
@dataclass
class ObjectMatch:
    """Object-level agreement between a predicted and a reference mask.

    Attributes
    ----------
    n_ref, n_pred : int
        Reference / predicted objects (8-connected, at least ``min_area`` px).
    n_ref_found : int
        Reference objects with a predicted pixel within the tolerance.
    n_pred_matched : int
        Predicted objects with a reference pixel within the tolerance.
    recall, precision, f1 : float
        ``n_ref_found / n_ref``, ``n_pred_matched / n_pred`` and their
        harmonic mean (see the module notes for empty inputs).
    """

    n_ref: int
    n_pred: int
    n_ref_found: int
    n_pred_matched: int
    recall: float
    precision: float
    f1: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def object_match(pred: np.ndarray, ref: np.ndarray, *, min_area: int = 9,
                 tolerance_px: int = 2) -> ObjectMatch:
    """Match objects of two masks.

    Parameters
    ----------
    pred, ref : numpy.ndarray
        Boolean masks of the same shape (True = dust).
    min_area : int
        Objects (8-connected components) smaller than this many pixels are
        not counted, on either side. They still count as "pixels near" an
        object of the other side.
    tolerance_px : int
        A reference object is found when any predicted pixel lies within
        this distance (pixels, Euclidean) of it, and vice versa.

    Returns
    -------
    ObjectMatch
    """
    p, r = _pair(pred, ref)
    tol = int(tolerance_px)
    r_labels, r_ids = _objects(r, min_area)
    p_labels, p_ids = _objects(p, min_area)
    found = int(np.count_nonzero(_touched(r_labels, r_ids, _near(p, tol))))
    matched = int(np.count_nonzero(_touched(p_labels, p_ids, _near(r, tol))))
    recall = _ratio(found, int(r_ids.size))
    precision = _ratio(matched, int(p_ids.size))
    f1 = 0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision)
    return ObjectMatch(int(r_ids.size), int(p_ids.size), found, matched,
                       float(recall), float(precision), float(f1))


def compare_masks(pred: np.ndarray, ref: np.ndarray, *, min_area: int = 9,
                  tolerance_px: int = 2) -> dict[str, Any]:
    """All mask agreement metrics in one JSON-friendly dict.

    Keys: ``pixel_iou``, ``dice``, ``coverage``, ``pred_pixels``,
    ``ref_pixels``, ``min_area``, ``tolerance_px`` and the fields of
    :class:`ObjectMatch` prefixed ``object_`` (``object_recall``, ...).
    """
    p, r = _pair(pred, ref)
    out: dict[str, Any] = {
        "pixel_iou": pixel_iou(p, r),
        "dice": dice(p, r),
        "coverage": coverage(p, r),
        "pred_pixels": int(np.count_nonzero(p)),
        "ref_pixels": int(np.count_nonzero(r)),
        "min_area": int(min_area),
        "tolerance_px": int(tolerance_px),
    }
    om = object_match(p, r, min_area=min_area, tolerance_px=tolerance_px)
    out.update({f"object_{k}": v for k, v in om.as_dict().items()})
    return out


def format_table(metrics: Mapping[str, Any]) -> str:
    """Two aligned columns ``name  value``; floats with 4 decimals."""
    if not metrics:
        return ""
    width = max(len(str(k)) for k in metrics)
    lines = []
    for key, value in metrics.items():
        if isinstance(value, float):
            text = "nan" if value != value else f"{value:.4f}"
        else:
            text = str(value)
        lines.append(f"{str(key):<{width}}  {text}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- flat metrics
def flat_error(flat: np.ndarray, true_flat: np.ndarray, region: np.ndarray) -> dict[str, Any]:
    """Relative error ``|flat / true_flat - 1|`` summarised over *region*.

    Parameters
    ----------
    flat, true_flat : numpy.ndarray
        Flats, 1.0 = no attenuation, same shape.
    region : numpy.ndarray
        Boolean mask of the pixels to evaluate (e.g. the dilated true dust mask).
        Pixels where either flat is not finite or ``true_flat <= 0`` are skipped.

    Returns
    -------
    dict
        ``median``, ``p90``, ``max`` (dimensionless fractions, 0.01 = 1 %) and
        ``n_pixels``. With no evaluable pixel the three statistics are ``None``.
    """
    f = np.asarray(flat, dtype=np.float64)
    t = np.asarray(true_flat, dtype=np.float64)
    reg = _as_bool(region, "region")
    if f.shape != t.shape or f.shape != reg.shape:
        raise InputError(f"shapes differ: flat {f.shape}, true flat {t.shape}, region {reg.shape}")
    ok = reg & np.isfinite(f) & np.isfinite(t) & (t > 0)
    if not ok.any():
        return {"median": None, "p90": None, "max": None, "n_pixels": 0}
    err = np.abs(f[ok] / t[ok] - 1.0)
    return {"median": float(np.median(err)), "p90": float(np.percentile(err, 90)),
            "max": float(err.max()), "n_pixels": int(err.size)}


def dark_feature_leakage(mask: np.ndarray, dark_feature_mask: np.ndarray,
                         dust_mask: np.ndarray, *, tolerance_px: int = 2) -> float:
    """Fraction of dark solar features (sunspots, pores, filaments) wrongly masked.

    A dark-feature object (8-connected component of *dark_feature_mask*) is
    leaked when *mask* covers at least one of its pixels that is farther than
    *tolerance_px* from real dust (*dust_mask*): masking the part of a spot
    that a dust shadow really overlaps is correct, masking the spot itself is
    not. Objects lying entirely under dust are not counted.

    Returns
    -------
    float
        Leaked objects / counted objects, 0.0 when there is none to count.
    """
    m, dark = _pair(mask, dark_feature_mask)
    _, dust = _pair(mask, dust_mask)
    free = dark & ~_near(dust, int(tolerance_px))
    labels, ids = _objects(dark, 1)
    counted = _touched(labels, ids, free)
    if not counted.any():
        return 0.0
    leaked = _touched(labels, ids, free & m)
    return float(np.count_nonzero(leaked & counted) / np.count_nonzero(counted))


# --------------------------------------------------------------------------- recall vs depth
def _depth_lookup(depth_per_label: Any, n_labels: int) -> np.ndarray:
    """Array ``depth[label]`` (NaN where unknown) from a mapping, array or object list."""
    depth = np.full(n_labels + 1, np.nan)
    if isinstance(depth_per_label, Mapping):
        items = depth_per_label.items()
    elif isinstance(depth_per_label, np.ndarray):
        items = enumerate(depth_per_label.tolist())
    elif isinstance(depth_per_label, Sequence) and depth_per_label and \
            isinstance(depth_per_label[0], Mapping):
        items = ((o["label"], o["depth"]) for o in depth_per_label)
    else:
        items = enumerate(depth_per_label)
    for lab, d in items:
        lab = int(lab)
        if 0 < lab <= n_labels:
            depth[lab] = float(d)
    return depth


def recall_by_depth_detail(pred: np.ndarray, dust_labels: np.ndarray, depth_per_label: Any,
                           min_depth: float, max_depth: float = np.inf, *,
                           tolerance_px: int = 2) -> dict[str, Any]:
    """Object recall of dust with ``min_depth < depth <= max_depth``, with counts.

    See :func:`recall_by_depth`. Returns ``{"n", "found", "recall",
    "min_depth", "max_depth"}``; ``recall`` is ``None`` when ``n == 0``.
    """
    p = _as_bool(pred, "predicted mask")
    labels = np.asarray(dust_labels)
    if labels.shape != p.shape:
        raise InputError(f"shapes differ: mask {p.shape}, dust labels {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    n_labels = int(labels.max()) if labels.size else 0
    depth = _depth_lookup(depth_per_label, n_labels)
    present = np.zeros(n_labels + 1, dtype=bool)
    present[np.unique(labels[labels > 0])] = True
    with np.errstate(invalid="ignore"):
        sel = present & (depth > min_depth) & (depth <= max_depth)
    ids = np.flatnonzero(sel)
    hit = _touched(labels, ids, _near(p, int(tolerance_px)))
    n, found = int(ids.size), int(np.count_nonzero(hit))
    return {"n": n, "found": found, "recall": None if n == 0 else found / n,
            "min_depth": float(min_depth),
            "max_depth": None if not np.isfinite(max_depth) else float(max_depth)}


def recall_by_depth(pred: np.ndarray, dust_labels: np.ndarray, depth_per_label: Any,
                    min_depth: float, *, max_depth: float = np.inf,
                    tolerance_px: int = 2) -> float:
    """Object recall for dust objects deeper than *min_depth*.

    Parameters
    ----------
    pred : numpy.ndarray
        Predicted boolean mask.
    dust_labels : numpy.ndarray
        Integer label image of the true dust objects (0 = no dust).
    depth_per_label : mapping, array or list of dicts
        Depth (fractional attenuation at the core, 0.1 = 10 %) per label:
        ``{label: depth}``, an array indexed by label, or a list of dicts with
        ``"label"`` and ``"depth"`` keys (the simulator's ``dust_objects``).
    min_depth : float
        Only objects with ``depth > min_depth`` count.
    max_depth : float
        And ``depth <= max_depth`` (default: no upper bound).
    tolerance_px : int
        An object is found when a predicted pixel lies within this distance.

    Returns
    -------
    float
        Found / counted objects; NaN when no object is in the depth range.
    """
    d = recall_by_depth_detail(pred, dust_labels, depth_per_label, min_depth, max_depth,
                               tolerance_px=tolerance_px)
    return float("nan") if d["recall"] is None else float(d["recall"])


def dust_residual(flat: np.ndarray, true_flat: np.ndarray, dust_labels: np.ndarray, depth_per_label: Any,
                  min_depth: float, *, core_fraction: float = 0.5) -> dict[str, Any]:
    """Dust left in calibrated data, object by object, as a fraction of the clean signal.

    After calibration a pixel reads ``clean * true_flat / flat``, so its residual
    is ``true_flat / flat - 1``. For each dust object deeper than *min_depth*, the
    residual is the median of that quantity over the object's **core** (pixels
    attenuated by at least ``core_fraction`` of its depth, where the shadow is),
    signed: negative = shadow left, positive = over-corrected. Texture errors
    average out in the median; what remains is the dust the flat did not remove.

    Returns ``{"n", "median_abs", "p90_abs", "max_abs", "per_object"}``.
    """
    flat = np.asarray(flat, np.float64)
    true_flat = np.asarray(true_flat, np.float64)
    depths = _depth_lookup(depth_per_label, int(dust_labels.max()) if dust_labels.size else 0)
    residual = true_flat / flat - 1.0
    per_object = {}
    for label in np.flatnonzero(depths > min_depth):
        if label == 0:
            continue
        region = dust_labels == label
        core = region & (1.0 - true_flat >= core_fraction * depths[label])
        if not core.any():
            continue
        per_object[int(label)] = float(np.median(residual[core]))
    values = np.abs(np.array(list(per_object.values()), dtype=np.float64))
    if values.size == 0:
        return {"n": 0, "median_abs": None, "p90_abs": None, "max_abs": None, "per_object": {}}
    return {"n": int(values.size), "median_abs": float(np.median(values)),
            "p90_abs": float(np.percentile(values, 90)), "max_abs": float(values.max()), "per_object": per_object}

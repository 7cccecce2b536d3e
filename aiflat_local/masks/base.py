"""The masker interface: reference image [+ frames] -> dust mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..registry import Registry


@dataclass
class MaskResult:
    """A detected dust mask.

    Attributes
    ----------
    mask : numpy.ndarray
        float32 ``(H, W)`` in [0, 1]; 1 = dust. Binary maskers return 0/1. The
        mask as detected: expansion and feathering happen in :mod:`aiflat_local.flat`.
    params : dict
        Backend name and every parameter that produced the mask (provenance).
    objects : list of dict
        Optional per-object facts (centroid, area, depth, ...), JSON-serialisable.
    """

    mask: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    objects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def binary(self) -> np.ndarray:
        """Boolean mask, ``mask >= 0.5``."""
        return self.mask >= 0.5


class Masker(Protocol):
    """Anything callable as ``masker(reference, frames=None) -> MaskResult``.

    ``reference`` is float32 ``(H, W)``, sensor orientation, arbitrary units
    (a temporal median). ``frames`` is an optional :class:`~aiflat_local.io.ser.SerReader`
    for backends that use motion.
    """

    name: str

    def __call__(self, reference: np.ndarray, *, frames: Any = None) -> MaskResult: ...


MASKERS: Registry[Masker] = Registry("masker")


def prepare_reference(reference: np.ndarray, masker: str) -> np.ndarray:
    """Validate a reference for a masker and return a float32 copy with non-finite pixels filled.

    Raises :class:`~aiflat_local.errors.InputError` for a non-2-D or tiny image,
    or one without a single finite pixel; NaN/Inf pixels take the median value.
    """
    from ..errors import InputError

    img = np.asarray(reference)
    if img.ndim != 2:
        raise InputError(f"the {masker} masker needs a 2-D image, got shape {img.shape}")
    if min(img.shape) < 8:
        raise InputError(f"image too small for dust detection: {img.shape[1]} x {img.shape[0]}")
    img = img.astype(np.float32, copy=True)
    bad = ~np.isfinite(img)
    if bad.all():
        raise InputError("the image has no finite pixel")
    if bad.any():
        img[bad] = np.median(img[~bad])
    return img

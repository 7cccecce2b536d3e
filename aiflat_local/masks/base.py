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

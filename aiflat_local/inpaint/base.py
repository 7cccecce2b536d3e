"""The inpainter interface: image + mask -> image with the masked pixels filled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..registry import Registry


@dataclass
class InpaintResult:
    """An inpainted image.

    Attributes
    ----------
    image : numpy.ndarray
        float32 ``(H, W)``; the inpainter's estimate of the dust-free image.
        Deterministic inpainters return the input unchanged outside the mask;
        learned ones may not (the flat builder only uses the masked pixels).
    params : dict
        Backend name, parameters, seeds (provenance).
    spread : numpy.ndarray or None
        Optional float32 uncertainty map (e.g. ensemble spread), same shape.
    """

    image: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    spread: np.ndarray | None = None


class Inpainter(Protocol):
    """Anything callable as ``inpainter(image, mask) -> InpaintResult``.

    ``image`` is float32 ``(H, W)``; ``mask`` is boolean ``(H, W)``, True = fill.
    """

    name: str

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> InpaintResult: ...


INPAINTERS: Registry[Inpainter] = Registry("inpainter")


def check_inputs(image: np.ndarray, mask: np.ndarray, what: str = "2-D") -> tuple[np.ndarray, np.ndarray]:
    """Validate an inpainter's inputs; return ``(image, boolean mask)``.

    Raises :class:`~aiflat_local.errors.InputError` for a non-2-D image or a
    mask of another shape. Nonzero mask values count as True.
    """
    from ..errors import InputError

    img = np.asarray(image)
    m = np.asarray(mask)
    if img.ndim != 2:
        raise InputError(f"image to inpaint must be {what}, got shape {img.shape}")
    if m.shape != img.shape:
        raise InputError(f"mask shape {m.shape} differs from image shape {img.shape}")
    return img, (m if m.dtype == bool else m != 0)

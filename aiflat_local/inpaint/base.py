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

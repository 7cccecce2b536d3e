"""Inpainters: image + mask -> image with the masked pixels filled, behind one interface.

``INPAINTERS.names()`` lists what exists; ``INPAINTERS.create(name, **options)``
builds one. Each backend module registers itself on import.
"""

from .base import INPAINTERS, InpaintResult, Inpainter
from . import harmonic  # noqa: F401  (registers "harmonic" and "biharmonic")

__all__ = ["INPAINTERS", "InpaintResult", "Inpainter"]

"""Inpainters: image + mask -> image with the masked pixels filled, behind one interface.

``INPAINTERS.names()`` lists what exists; ``INPAINTERS.create(name, **options)``
builds one. Every module in this package registers its backends on import.
"""

from ..registry import import_backends
from .base import INPAINTERS, InpaintResult, Inpainter

import_backends(__name__, __path__)

__all__ = ["INPAINTERS", "InpaintResult", "Inpainter"]

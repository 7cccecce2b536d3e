"""Dust maskers: reference image [+ frames] -> dust mask, behind one interface.

``MASKERS.names()`` lists what exists; ``MASKERS.create(name, **options)``
builds one. Every module in this package registers its backends on import
(they are all imported here, so a new backend only needs its own file); heavy
libraries are imported inside the backend when it is used, never at import.
"""

from ..registry import import_backends
from .base import MASKERS, MaskResult, Masker

import_backends(__name__, __path__)

__all__ = ["MASKERS", "MaskResult", "Masker"]

"""Dust maskers: reference image [+ frames] -> dust mask, behind one interface.

``MASKERS.names()`` lists what exists; ``MASKERS.create(name, **options)``
builds one. Each backend module registers itself on import; heavy libraries
are imported inside the backend, never here.
"""

from .base import MASKERS, MaskResult, Masker
from . import classical  # noqa: F401  (registers "classical")

__all__ = ["MASKERS", "MaskResult", "Masker"]

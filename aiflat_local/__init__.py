"""aiflat-local: offline removal of sensor-dust shadows from solar videos.

The pipeline (one module each, data flows one way)::

    io/ -> reference.py -> masks/ -> inpaint/ -> flat.py -> calibrate.py

Importing the package is cheap: numpy, scipy and astropy at most. Learned
backends import torch, transformers or diffusers only when they are used.
"""

__version__ = "0.1.0"

from .errors import AiflatError, BackendError, InputError, OutputError, WeightsError  # noqa: E402

__all__ = ["__version__", "AiflatError", "BackendError", "InputError", "OutputError", "WeightsError"]

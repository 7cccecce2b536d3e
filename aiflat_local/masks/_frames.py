"""The video's frames as the appearance maskers read them, and the Sun's motion in a sample of them.

Shared by the classical and dustnet maskers, whose frame checks (does an
object stay on the sensor or move with the Sun?) need a few evenly spaced
frames and the Sun's shift in each: :func:`register_sample` reads them
through :func:`frame_source` and registers them with
:func:`aiflat_local.motion.register_frames`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..io.ser import MOSAIC_IDS


def frame_source(frames: Any) -> tuple[int, Callable[[int], np.ndarray]]:
    """``(n_frames, get)`` for a SerReader-like object, an array ``(n, H, W)`` or a list.

    ``get(i)`` is frame *i* as float32 ``(H, W)``: RGB averaged, a Bayer or
    CMY mosaic balanced like the reference (:func:`~aiflat_local.reference.balance_cfa`).
    """
    header = getattr(frames, "header", None)
    color_id = int(getattr(header, "color_id", 0) or 0)
    if hasattr(frames, "frame"):
        n = int(getattr(frames, "n_frames", None) or len(frames))
        fetch = frames.frame
    else:
        n, fetch = len(frames), frames.__getitem__

    def get(i: int) -> np.ndarray:
        f = np.asarray(fetch(i), dtype=np.float32)
        if f.ndim == 3:
            f = f.mean(axis=2)
        if color_id in MOSAIC_IDS:
            from ..reference import balance_cfa

            f = balance_cfa(f, color_id)
        return f

    return n, get


class FrameView:
    """Frames given by ``get`` as :func:`aiflat_local.motion.register_frames` reads a video."""

    def __init__(self, n_frames: int, get: Callable[[int], np.ndarray], shape: tuple[int, int]) -> None:
        self.n_frames = int(n_frames)
        self.frame = get
        self.height, self.width = int(shape[0]), int(shape[1])


@dataclass
class FrameSample:
    """Evenly spaced frames of a video and the Sun's motion in them.

    Attributes
    ----------
    indices : numpy.ndarray
        The frame numbers (int).
    shifts : numpy.ndarray
        ``(n, 2)`` ``(dy, dx)`` px about their median: frame ``k`` shows at
        ``(y, x)`` what the median position shows at ``(y - dy, x - dx)``.
    scales : numpy.ndarray
        ``(n,)`` brightness factor that brings each frame to the median frame's level.
    rms_px : float
        Root-mean-square of the shifts (px).
    get : callable
        ``get(i)``: frame *i* as :func:`frame_source` gives it.
    """

    indices: np.ndarray
    shifts: np.ndarray
    scales: np.ndarray
    rms_px: float
    get: Callable[[int], np.ndarray]


def register_sample(frames: Any, shape: tuple[int, int], *, n_frames: int, exclude: np.ndarray | None = None,
                    min_rms_px: float = 0.7) -> tuple[FrameSample | None, dict[str, Any]]:
    """Read up to *n_frames* evenly spaced frames and measure the Sun's shift in each.

    :func:`aiflat_local.motion.register_frames`, one pass against the middle
    frame on the central 512 x 512 px, *exclude* (sensor pixels, e.g. the
    darkest spots) left out so that dust does not pull the shifts towards zero.
    Returns ``(sample, info)``; the sample is None, and ``info["note"]`` says
    why, with fewer than 3 frames, frames of another shape than *shape*, or an
    rms motion below *min_rms_px* (the frames cannot tell dust from the Sun then).
    ``info``: ``n_frames_read``, ``shift_rms_px``, ``usable``.
    """
    from ..motion import register_frames

    n_total, get = frame_source(frames)
    info: dict[str, Any] = {"usable": False, "n_frames_read": 0}
    if n_total < 3:
        info["note"] = "fewer than 3 frames"
        return None, info
    idx = np.unique(np.linspace(0, n_total - 1, min(n_total, max(3, int(n_frames)))).round().astype(int))
    first = get(int(idx[0]))
    if first.shape != tuple(shape):
        info["note"] = f"frame shape {first.shape} differs from the reference {tuple(shape)}"
        return None, info
    reg = register_frames(FrameView(n_total, get, first.shape), frame_indices=idx, max_frames=None, rounds=0,
                          crop_px=512, exclude=exclude)
    idx = np.asarray(reg.frame_indices)  # the frames the shifts belong to
    shifts = reg.shifts - np.median(reg.shifts, axis=0)
    scales = np.exp(np.median(reg.offsets) - reg.offsets)
    rms = float(np.sqrt((shifts ** 2).sum(axis=1).mean()))
    info.update(n_frames_read=int(idx.size), shift_rms_px=round(rms, 3))
    if rms < min_rms_px:
        info["note"] = f"too little motion ({rms:.2f} px rms) to tell dust from solar features"
        return None, info
    info["usable"] = True
    return FrameSample(idx, shifts, scales, rms, get), info

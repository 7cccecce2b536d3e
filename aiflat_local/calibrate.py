"""Apply a flat to frames: ``calibrated = round(raw / flat)``, streaming, counted, never wrapped.

Conventions
-----------
- A flat is a float ``(H, W)`` gain map, 1.0 = no attenuation, in sensor
  orientation (row 0 = first SER row). For RGB frames ``(H, W, 3)`` every
  channel is divided by the same flat; Bayer mosaics are calibrated on the
  mosaic itself (one gain per photosite).
- Arithmetic is float32: each sample is multiplied by the float32 reciprocal
  of the flat (``1 / flat`` computed in float64, then rounded to float32),
  rounded to the nearest integer (ties to even, ``numpy.rint``) and clipped to
  the output type's range. Clipped samples are **counted**, never wrapped.
- Flat values that are not finite or not positive cannot be divided by: they
  are treated as 1.0 (the pixel is left unchanged) and counted as guarded.
- Where the flat is exactly 1.0 (all of the frame outside the dust mask, for
  the flats this tool builds) the output sample equals the input sample,
  bit for bit. :func:`calibrate_ser` uses that: when few pixels differ from 1.0
  it copies each frame and recomputes only those pixels, which keeps a whole
  video close to plain file-copy speed. The result is identical either way.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import InputError
from .io.ser import HEADER_SIZE, SerReader, SerWriter
from .reference import _SampleFile

__all__ = ["CalibrationStats", "FlatCounts", "apply_flat", "calibrate_ser", "calibrate_image"]

#: Use the sparse path (copy, then fix the pixels whose flat is not 1.0) when at
#: most this fraction of the pixels differ from 1.0. A gather/scatter costs about
#: as much per sample as five streaming passes of the dense path.
_SPARSE_MAX_FRACTION = 0.2
#: Samples per block of the dense path (kept in the CPU caches).
_DENSE_BLOCK = 1 << 16
#: Bytes of frames per chunk read, computed and written together.
_CHUNK_BYTES = 16 * 2**20


@dataclass
class CalibrationStats:
    """What a calibration did, for ``report.json`` and the log.

    Attributes
    ----------
    n_frames : int
        Frames calibrated.
    n_pixels : int
        Samples processed in total: frames x height x width (x 3 for RGB).
    n_clipped_high, n_clipped_low : int
        Samples (over all frames) whose calibrated value fell above or below
        the output type's range and were clipped to it. Always 0 for float output.
    n_nonfinite : int
        Flat pixels that were not finite, not positive or outside [1e-30, 1e30],
        treated as 1.0 (guarded).
    n_flat_changed : int
        Flat pixels different from 1.0 after guarding: the only pixels calibration changes.
    dtype : str
        Output sample type, e.g. ``"uint16"``.
    flat_min, flat_max : float
        Range of the flat after guarding.
    """

    n_frames: int
    n_pixels: int
    n_clipped_high: int
    n_clipped_low: int
    n_nonfinite: int
    dtype: str
    flat_min: float
    flat_max: float
    n_flat_changed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of the fields."""
        return {k: (v if isinstance(v, str) else (float(v) if isinstance(v, float) else int(v)))
                for k, v in asdict(self).items()}


class FlatCounts(NamedTuple):
    """Counts from one :func:`apply_flat` call (samples, and guarded flat pixels)."""

    clipped_high: int
    clipped_low: int
    guarded: int


#: Flat values outside this range (or not finite) are guarded: their float32
#: reciprocal would underflow or overflow.
_FLAT_RANGE = (1e-30, 1e30)


def _guard_flat(flat: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 flat with unusable values replaced by 1.0, and how many were replaced.

    Unusable: not finite, not positive, or outside ``_FLAT_RANGE``.
    """
    arr = np.asarray(flat)
    if arr.ndim != 2:
        raise InputError(f"a flat must be a 2-D (H, W) image, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(f"a flat must be real numbers, got dtype {arr.dtype}")
    f64 = arr.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore"):
        good = (f64 >= _FLAT_RANGE[0]) & (f64 <= _FLAT_RANGE[1])  # False for NaN
    n_bad = int(good.size - np.count_nonzero(good))
    out = np.where(good, f64, 1.0).astype(np.float32)
    return out, n_bad


def _output_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind not in "uif" or dt.itemsize > 8:
        raise InputError(f"cannot calibrate into sample type {dt}")
    return dt


class _Applier:
    """A flat prepared for repeated application: reciprocal, changed pixels, type limits.

    Frames are handled as 2-D sample planes ``(H, W * planes)``; for RGB the
    reciprocal is repeated over the three channels of each pixel.
    """

    def __init__(self, flat: np.ndarray, planes: int, src_dtype: np.dtype, dtype: np.dtype):
        self.flat, self.guarded = _guard_flat(flat)
        self.height, self.width = self.flat.shape
        self.planes = planes
        self.dtype = dtype
        self.src_dtype = np.dtype(src_dtype)
        inv = (1.0 / self.flat.astype(np.float64)).astype(np.float32)
        changed = inv != 1.0
        self.n_changed = int(np.count_nonzero(changed))
        if planes > 1:
            inv = np.repeat(inv, planes, axis=1)
            changed = np.repeat(changed, planes, axis=1)
        self.inv = inv  # (H, W * planes) float32
        self.integer = dtype.kind in "ui"
        self.sparse = self.n_changed <= _SPARSE_MAX_FRACTION * self.flat.size
        if self.sparse:
            self.idx = np.flatnonzero(changed)
            self.inv_idx = inv.ravel()[self.idx]
        self.work = np.float64 if dtype == np.float64 else np.float32
        self._scratch: np.ndarray | None = None  # one caller thread at a time
        if self.integer:
            info = np.iinfo(dtype)
            self.lo, self.hi = info.min, info.max
            src_float = self.src_dtype.kind == "f"
            src_max = np.inf if src_float else np.iinfo(self.src_dtype).max
            src_min = -np.inf if src_float else np.iinfo(self.src_dtype).min
            inv_max = float(inv.max()) if inv.size else 1.0
            # Can a product round outside [lo, hi]? (inv > 0 everywhere.)
            self.check_high = src_max * inv_max >= self.hi + 0.5
            self.check_low = src_float or src_min * inv_max <= self.lo - 0.5 or (
                src_min < 0 and self.lo >= 0)
            self.check_nan = src_float

    @property
    def flat_range(self) -> tuple[float, float]:
        if self.flat.size == 0:
            return 1.0, 1.0
        return float(self.flat.min()), float(self.flat.max())

    # -- core ---------------------------------------------------------------
    def _finish(self, f: np.ndarray) -> tuple[int, int]:
        """Round and clip float samples in place (integer output); return clip counts."""
        high = low = 0
        np.rint(f, out=f)
        if self.check_nan:
            nan = np.isnan(f)
            if nan.any():
                low += int(np.count_nonzero(nan))
                f[nan] = self.lo
        if self.check_high:
            top = f.max() if f.size else self.hi
            if top > self.hi:
                high = int(np.count_nonzero(f > self.hi))
                np.minimum(f, self.work(self.hi), out=f)
        if self.check_low:
            bottom = f.min() if f.size else self.lo
            if bottom < self.lo:
                low += int(np.count_nonzero(f < self.lo))
                np.maximum(f, self.work(self.lo), out=f)
        return high, low

    def apply(self, src: np.ndarray, out: np.ndarray) -> tuple[int, int]:
        """Calibrate ``src`` ``(k, H, W*planes)`` into ``out`` (same shape, output dtype).

        ``src`` may be read-only, or ``out`` itself (in place). Returns
        ``(clipped_high, clipped_low)``.
        """
        # Overflow to inf (huge float input) is handled by the clipping below.
        with np.errstate(over="ignore", invalid="ignore"):
            if self.sparse and self.integer and self.src_dtype == self.dtype:
                return self._apply_sparse(src, out)
            return self._apply_dense(src, out)

    def _apply_sparse(self, src: np.ndarray, out: np.ndarray) -> tuple[int, int]:
        if src is not out:
            np.copyto(out, src)
        if self.idx.size == 0:
            return 0, 0
        flat_view = out.reshape(out.shape[0], -1)
        vals = flat_view[:, self.idx].astype(self.work)
        vals *= self.inv_idx
        high, low = self._finish(vals)
        flat_view[:, self.idx] = vals
        return high, low

    def _apply_dense(self, src: np.ndarray, out: np.ndarray) -> tuple[int, int]:
        k, h, w = src.shape
        rows = max(1, _DENSE_BLOCK // max(w, 1))
        scratch = self._scratch
        if scratch is None or scratch.size < rows * w:
            scratch = self._scratch = np.empty(rows * w, dtype=self.work)
        high = low = 0
        for i in range(k):
            for y in range(0, h, rows):
                y1 = min(h, y + rows)
                f = scratch[: (y1 - y) * w].reshape(y1 - y, w)
                np.copyto(f, src[i, y:y1], casting="unsafe")
                f *= self.inv[y:y1]
                if self.integer:
                    hh, ll = self._finish(f)
                    high += hh
                    low += ll
                np.copyto(out[i, y:y1], f, casting="unsafe")
        return high, low


def _planes_of(frame_shape: tuple[int, ...], flat_shape: tuple[int, ...]) -> int:
    """1 for ``(..., H, W)`` frames, 3 for ``(..., H, W, 3)``; InputError if the flat does not fit."""
    if len(flat_shape) != 2:
        raise InputError(f"a flat must be a 2-D (H, W) image, got shape {flat_shape}")
    if len(frame_shape) >= 2 and tuple(frame_shape[-2:]) == tuple(flat_shape):
        return 1
    if len(frame_shape) >= 3 and frame_shape[-1] == 3 and tuple(frame_shape[-3:-1]) == tuple(flat_shape):
        return 3
    raise InputError(
        f"flat shape {tuple(flat_shape)} does not match frame shape {tuple(frame_shape)} "
        "(expected the same height and width)"
    )


def _apply(frame: np.ndarray, flat: np.ndarray, dtype: Any) -> tuple[np.ndarray, int, int, _Applier]:
    arr = np.asarray(frame)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(f"cannot calibrate samples of type {arr.dtype}")
    out_dtype = _output_dtype(arr.dtype if dtype is None else dtype)
    flat_arr = np.asarray(flat)
    planes = _planes_of(arr.shape, flat_arr.shape)
    applier = _Applier(flat_arr, planes, arr.dtype, out_dtype)
    h, w = flat_arr.shape
    src = arr.reshape(-1, h, w * planes)
    out = np.empty(src.shape, dtype=out_dtype)
    high, low = applier.apply(src, out)
    return out.reshape(arr.shape), high, low, applier


def apply_flat(frame: np.ndarray, flat: np.ndarray, dtype: Any = None) -> tuple[np.ndarray, FlatCounts]:
    """Divide a frame (or a stack of frames) by a flat.

    Parameters
    ----------
    frame
        ``(H, W)``, ``(H, W, 3)`` RGB, or a stack ``(n, H, W)`` / ``(n, H, W, 3)``;
        any real dtype. (A frame whose last two axes match the flat is taken
        as mono.)
    flat
        ``(H, W)`` gain, 1.0 = no attenuation. Values that are not finite, not
        positive or outside [1e-30, 1e30] are treated as 1.0 and counted
        (``guarded``).
    dtype
        Output type; default the frame's. Integer output is rounded to nearest
        (ties to even) and clipped to the type's range, clipped samples counted
        (NaN input counts as clipped low and becomes the minimum). Float output
        is ``frame * (1 / flat)`` without rounding or clipping.

    Returns
    -------
    calibrated : numpy.ndarray
        Same shape as ``frame``, of type ``dtype``.
    counts : FlatCounts
        ``clipped_high``, ``clipped_low`` (samples) and ``guarded`` (flat pixels).
    """
    out, high, low, applier = _apply(frame, flat, dtype)
    return out, FlatCounts(high, low, applier.guarded)


def calibrate_image(
    image: np.ndarray, flat: np.ndarray, dtype: Any = None
) -> tuple[np.ndarray, CalibrationStats]:
    """Calibrate one image; like :func:`apply_flat` but returns :class:`CalibrationStats`.

    ``dtype`` defaults to the image's own type, so float input stays float
    (float16 becomes float32) and integer input is rounded and clipped.
    """
    arr = np.asarray(image)
    if dtype is None and arr.dtype == np.float16:
        dtype = np.float32
    out, high, low, applier = _apply(arr, flat, dtype)
    fmin, fmax = applier.flat_range
    stats = CalibrationStats(
        n_frames=1, n_pixels=int(arr.size), n_clipped_high=high, n_clipped_low=low,
        n_nonfinite=applier.guarded, dtype=str(out.dtype), flat_min=fmin, flat_max=fmax,
        n_flat_changed=applier.n_changed,
    )
    return out, stats


def calibrate_ser(
    in_path: str | os.PathLike,
    flat: np.ndarray,
    out_path: str | os.PathLike,
    *,
    progress: bool = False,
) -> CalibrationStats:
    """Calibrate every frame of a SER video into a new SER video, streaming.

    The output has the input's header (ColorID, depth, observer/instrument/
    telescope, dates), sample type and per-frame timestamps; it is written
    little-endian under a temporary name and renamed onto ``out_path`` only
    when complete. The input is never modified and cannot be the output.

    Frames are read a few MiB at a time with positioned reads (not through a
    memory map, so resident memory stays at a few tens of MiB however long
    the video); the arithmetic of one chunk runs in a helper thread while the
    previous chunk is written.

    Parameters
    ----------
    in_path
        The SER video.
    flat
        ``(H, W)`` gain, 1.0 = no attenuation, in SER row order.
    out_path
        The calibrated SER to write.
    progress
        Show a tqdm progress bar over frames on stderr.

    Returns
    -------
    CalibrationStats

    Raises
    ------
    InputError
        The SER cannot be read or the flat's shape is not the frame's ``(H, W)``.
    OutputError
        ``out_path`` cannot be written or is the input.
    """
    flat_arr = np.asarray(flat)
    with SerReader(in_path) as reader:
        h, w = reader.height, reader.width
        if flat_arr.shape != (h, w):
            raise InputError(
                f"flat shape {flat_arr.shape} does not match the frames of {in_path} "
                f"({h}, {w}) (height, width)"
            )
        planes = reader.planes
        dtype = reader.dtype
        applier = _Applier(flat_arr, planes, dtype, dtype)
        n = reader.n_frames
        frame_bytes = h * w * planes * dtype.itemsize
        per_chunk = int(max(1, min(n, _CHUNK_BYTES // max(frame_bytes, 1))))
        starts = list(range(0, n, per_chunk))
        buffers = [np.empty((per_chunk, h, w * planes), dtype=dtype) for _ in range(min(2, len(starts)))]
        # Samples are processed in file order (byte order converted on the
        # way); BGR frames are handed to the writer as RGB views, which it
        # turns back into BGR.
        file_dtype = dtype.newbyteorder("<" if reader.byteorder == "little" else ">")
        direct = file_dtype == dtype  # native order: read straight into the output buffer
        staging = None if direct else np.empty((per_chunk, h, w * planes), dtype=file_dtype)
        frame_shape = reader.frame_shape
        bgr = reader.header.color_id == 101
        samples = _SampleFile(Path(in_path))

        def process(c: int) -> tuple[np.ndarray, int, int]:
            f0 = starts[c]
            f1 = min(n, f0 + per_chunk)
            out = buffers[c % 2][: f1 - f0]
            src = out if staging is None else staging[: f1 - f0]
            samples.read_into(src, HEADER_SIZE + f0 * frame_bytes)
            hi, lo = applier.apply(src, out)
            return out, hi, lo

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="calibrate", unit="frame", leave=False)
        high = low = 0
        try:
            with SerWriter(
                out_path, width=w, height=h, dtype=dtype, like=reader.header,
                timestamps=reader.timestamps, protect=(in_path,),
            ) as writer, ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(process, 0)
                for c in range(len(starts)):
                    ahead = pool.submit(process, c + 1) if c + 1 < len(starts) else None
                    out, hi, lo = pending.result()
                    high += hi
                    low += lo
                    for frame in out:
                        frame = frame.reshape(frame_shape)
                        writer.write(frame[..., ::-1] if bgr else frame)
                    if bar is not None:
                        bar.update(len(out))
                    pending = ahead
        finally:
            samples.close()
            if bar is not None:
                bar.close()
        fmin, fmax = applier.flat_range
        return CalibrationStats(
            n_frames=n, n_pixels=n * h * w * planes, n_clipped_high=high, n_clipped_low=low,
            n_nonfinite=applier.guarded, dtype=str(dtype), flat_min=fmin, flat_max=fmax,
            n_flat_changed=applier.n_changed,
        )

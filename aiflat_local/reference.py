"""The reference image of a video: an exact temporal median with bounded memory.

The reference is the per-pixel median of the selected frames. Dust shadows sit
still on the sensor while the Sun drifts and the seeing boils, so the median
keeps the shadows and smooths everything that moves.

How it is computed
------------------
The original cloud tool read every frame into a Python list and called
``np.median(np.array(frames), axis=0)``: about three copies of the whole video
in memory and a partition along a strided axis. Here the frame rectangle is cut
into *bands* of whole rows (or, for very long videos, pieces of one row). A
band is read across all selected frames with one positioned read per frame
(``os.preadv``; no memory map, so the resident memory really is what the
buffers hold), then copied in cache-sized *tiles* into a pixel-major buffer
``(pixels, frames)`` that is partitioned in place along its contiguous last
axis (numpy's single-``kth`` partition, SIMD-accelerated on x86). Bands run on
a small thread pool: file reads, copies and partitions release the GIL, so two
workers run close to twice as fast as one.

The working memory is bounded by ``max_memory_mb`` whatever the number of
frames (bands get thinner, tiles narrower); the result itself, ``H x W x 4``
bytes, comes on top.

Exactness
---------
The result is bit-identical to
``np.median(np.stack(frames), axis=0).astype(np.float32)`` over the same
frames: for an odd count it is the middle value; for an even count it is the
mean of the two middle values computed in float64, exactly as ``np.median``
does. Both are exact in float32 for 8- and 16-bit samples (at most 17
significant bits).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .io.ser import HEADER_SIZE, MOSAIC_IDS, SerReader

__all__ = ["temporal_median", "read_reference", "balance_cfa", "reference_to_mono"]

#: Target size of one tile's pixel-major buffer. Tiles of a few MiB keep the
#: transposing copy and the partition in the CPU caches: on a 1920 x 1200 x 200
#: uint16 video, 1-4 MiB tiles ran 1.5-2x faster than 6-12 MiB ones (2-core
#: AMD EPYC, numpy 2.4). Lowered further when ``max_memory_mb`` asks for less.
_TARGET_TILE_BYTES = 2 * 2**20
#: Frames moved per transposing copy: 16 bytes per pixel per numpy call (8
#: uint16 frames) was fastest; copying all frames of a tile in one call was
#: about 4x slower, 2 frames per call 3x slower (Python overhead).
_COPY_BYTES = 16
#: Target size of one band read from the file (all selected frames, a few
#: whole rows): large enough that each frame's piece is one read of tens of KiB.
_TARGET_BAND_BYTES = 24 * 2**20


def _frame_indices(n_total: int, start: int, stop: int | None, step: int, where: str) -> range:
    """The selected frame numbers, Python slice semantics; InputError when empty or invalid."""
    for name, value in (("start", start), ("step", step)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise InputError(f"{where}: frame {name} must be an integer, not {value!r}")
    if stop is not None and (not isinstance(stop, (int, np.integer)) or isinstance(stop, bool)):
        raise InputError(f"{where}: frame stop must be an integer or None, not {stop!r}")
    if step < 1:
        raise InputError(f"{where}: frame step must be >= 1, not {step}")
    frames = range(*slice(int(start), None if stop is None else int(stop), int(step)).indices(n_total))
    if len(frames) == 0:
        raise InputError(
            f"{where}: frames start={start} stop={stop} step={step} select no frame "
            f"(the video has {n_total} frame(s), numbered 0..{n_total - 1})"
        )
    return frames


@dataclass(frozen=True)
class _Plan:
    """How the frame rectangle is cut: bands read from the file, tiles computed in cache.

    A *band* is ``band_rows`` whole rows (``band_cols == row_len``), or, when one
    whole row across all frames does not fit, a piece of one row. Its samples
    are staged ``chunk`` frames at a time in a ``(chunk, band_rows, band_cols)``
    buffer and copied, transposed, into pixel-major tiles ``(tile_px, n)``.
    With ``whole_rows`` (then ``chunk == n``) a band is split into many
    tiles; otherwise the band (a piece of one row) is one tile, filled chunk by
    chunk.
    """

    band_rows: int
    band_cols: int
    chunk: int
    tile_px: int
    whole_rows: bool

    def worker_bytes(self, n: int, itemsize: int) -> int:
        """Working memory of one worker: staging + tile + float64 results."""
        staging = self.chunk * self.band_rows * self.band_cols * itemsize
        return staging + self.tile_px * (n * itemsize + 24)


def _plan(height: int, row_len: int, n: int, itemsize: int, budget: int, workers: int) -> _Plan:
    """Choose band and tile sizes so that ``workers`` workers fit in ``budget`` bytes."""
    share = max(1, budget // workers)
    per_pixel = n * itemsize + 24  # one tile column of samples + float64 temporaries
    row_all = n * row_len * itemsize  # one whole row across all frames
    if row_all <= share // 2:
        # Whole rows, all frames staged at once; the tiles get the rest.
        rows = min(height, share // 2 // row_all, max(1, _TARGET_BAND_BYTES // row_all))
        band_px = rows * row_len
        tile_px = min(band_px, max(1, _TARGET_TILE_BYTES // per_pixel),
                      max(1, (share - rows * row_all) // per_pixel))
        return _Plan(rows, row_len, n, tile_px, True)
    # A piece of one row: the tile holds all frames of it, staged in chunks.
    cols = int(max(1, min(row_len, share * 3 // 4 // per_pixel)))
    chunk = int(max(1, min(n, (share - cols * per_pixel) // (cols * itemsize))))
    return _Plan(1, cols, chunk, cols, False)


class _SampleFile:
    """Positioned reads of the raw SER samples (no memory map: only our buffers count as RSS)."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "rb", buffering=0)
        self._fd = self._fh.fileno()
        self._lock = None if hasattr(os, "preadv") else threading.Lock()
        self.path = path

    def read_into(self, buf: np.ndarray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        while view.nbytes:
            if self._lock is None:
                got = os.preadv(self._fd, [view], offset)
            else:  # platforms without preadv (Windows): seek + read, serialised
                with self._lock:
                    self._fh.seek(offset)
                    got = self._fh.readinto(view)
            if not got:
                raise InputError(f"{self.path}: unexpected end of file while reading frames")
            view = view[got:]
            offset += got

    def close(self) -> None:
        self._fh.close()


def temporal_median(
    reader: SerReader,
    *,
    start: int = 0,
    stop: int | None = None,
    step: int = 1,
    max_memory_mb: float = 256,
    workers: int = 2,
    progress: bool = False,
) -> np.ndarray:
    """Exact per-pixel temporal median of frames ``start:stop:step`` of a SER video.

    Parameters
    ----------
    reader
        An open :class:`~aiflat_local.io.ser.SerReader` (its header, byte order
        and frame count are used; samples are read with positioned reads).
    start, stop, step
        Frame selection with Python slice semantics (negative ``start``/``stop``
        count from the end; ``step >= 1``).
    max_memory_mb
        Upper bound, in MiB, on the working memory (staging and tile buffers of
        all workers); it does not grow with the number of frames. The returned
        image (``H * W * 4`` bytes, times 3 for RGB) comes on top.
    workers
        Threads working on different bands (numpy and file reads release the
        GIL). 1 runs everything in the calling thread.
    progress
        Show a tqdm progress bar over bands on stderr.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` (mono or raw Bayer mosaic) or ``(H, W, 3)`` (RGB
        order for RGB/BGR videos), in sensor orientation, in the input's ADU.
        Bit-identical to ``np.median(np.stack(frames), axis=0).astype(np.float32)``.

    Raises
    ------
    InputError
        The selection is empty, an argument is out of range, or the file
        ends early.
    """
    where = str(getattr(reader, "path", "SER"))
    frames = _frame_indices(reader.n_frames, start, stop, step, where)
    if not (isinstance(workers, (int, np.integer)) and not isinstance(workers, bool) and workers >= 1):
        raise InputError(f"workers must be an integer >= 1, not {workers!r}")
    try:
        budget = int(float(max_memory_mb) * 2**20)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"max_memory_mb must be a number, not {max_memory_mb!r}") from None
    if budget <= 0:
        raise InputError(f"max_memory_mb must be > 0, not {max_memory_mb!r}")

    header = reader.header
    n = len(frames)
    height = reader.height
    planes = header.planes
    row_len = reader.width * planes
    itemsize = reader.dtype.itemsize
    file_dtype = np.dtype(reader.dtype).newbyteorder("<" if reader.byteorder == "little" else ">")
    frame_bytes = header.frame_bytes
    plan = _plan(height, row_len, n, itemsize, budget, int(workers))
    n_bands = -(-height // plan.band_rows) * -(-row_len // plan.band_cols)

    def bands():
        for r0 in range(0, height, plan.band_rows):
            for c0 in range(0, row_len, plan.band_cols):
                yield r0, min(r0 + plan.band_rows, height), c0, min(c0 + plan.band_cols, row_len)

    out = np.empty((height, row_len), dtype=np.float32)
    local = threading.local()
    half = n // 2
    even = n % 2 == 0
    sample_file = _SampleFile(Path(reader.path))

    def buffers() -> tuple[np.ndarray, np.ndarray]:
        if getattr(local, "staging", None) is None:
            local.staging = np.empty(plan.chunk * plan.band_rows * plan.band_cols, dtype=file_dtype)
            local.tile = np.empty((plan.tile_px, n), dtype=reader.dtype)
        return local.staging, local.tile

    def median_of(tile: np.ndarray) -> np.ndarray:
        """Median along the last axis of a pixel-major tile (partitioned in place)."""
        tile.partition(half, axis=-1)
        upper = tile[:, half]
        if not even:
            return upper
        lower = tile[:, :half].max(axis=-1)
        return (lower.astype(np.float64) + upper) / 2.0  # as np.median: a float64 mean

    def stage(staging: np.ndarray, f0: int, f1: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Read frames ``f0:f1`` (selection numbers) of a band into ``staging``: ``(k, rows, cols)``."""
        s = staging[: (f1 - f0) * (r1 - r0) * (c1 - c0)].reshape(f1 - f0, r1 - r0, c1 - c0)
        for j in range(f0, f1):
            offset = HEADER_SIZE + frames[j] * frame_bytes + (r0 * row_len + c0) * itemsize
            sample_file.read_into(s[j - f0], offset)
        return s

    step_f = max(1, _COPY_BYTES // itemsize)

    def fill(t: np.ndarray, s: np.ndarray, f0: int) -> None:
        """``t[:, f0:f0+k] = s.T`` for staged ``s`` ``(k, pixels)``, a few frames per call."""
        for a in range(0, s.shape[0], step_f):
            b = min(s.shape[0], a + step_f)
            t[:, f0 + a : f0 + b] = s[a:b].T

    def work(band: tuple[int, int, int, int]) -> None:
        r0, r1, c0, c1 = band
        staging, tile = buffers()
        if plan.whole_rows:
            s = stage(staging, 0, n, r0, r1, c0, c1).reshape(n, -1)
            px = s.shape[1]
            res = out.reshape(-1)[r0 * row_len : r1 * row_len]  # whole rows: a view
            for p0 in range(0, px, plan.tile_px):
                p1 = min(px, p0 + plan.tile_px)
                t = tile[: p1 - p0]
                fill(t, s[:, p0:p1], 0)
                res[p0:p1] = median_of(t)
        else:
            t = tile[: c1 - c0]
            for f0 in range(0, n, plan.chunk):
                f1 = min(n, f0 + plan.chunk)
                fill(t, stage(staging, f0, f1, r0, r1, c0, c1).reshape(f1 - f0, -1), f0)
            out[r0, c0:c1] = median_of(t)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_bands, desc="temporal median", unit="band", leave=False)
    # Workers pull bands from one shared generator: no per-band futures, however
    # many bands a very long video needs.
    lock = threading.Lock()
    pending = bands()
    failed = threading.Event()

    def run() -> None:
        while not failed.is_set():
            with lock:
                band = next(pending, None)
            if band is None:
                return
            try:
                work(band)
            except BaseException:
                failed.set()
                raise
            if bar is not None:
                with lock:
                    bar.update()

    n_workers = int(min(workers, n_bands))
    try:
        if n_workers == 1:
            run()
        else:
            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                for future in [pool.submit(run) for _ in range(n_workers)]:
                    future.result()
    finally:
        sample_file.close()
        if bar is not None:
            bar.close()
    if planes == 3:
        image = out.reshape(height, reader.width, 3)
        return np.ascontiguousarray(image[..., ::-1]) if header.color_id == 101 else image
    return out.reshape(height, reader.width)


def read_reference(
    path: str | os.PathLike,
    *,
    start: int = 0,
    stop: int | None = None,
    step: int = 1,
    max_memory_mb: float = 256,
    workers: int = 2,
    progress: bool = False,
    byteorder: str = "auto",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Open a SER video and return its temporal median and where it came from.

    Parameters are those of :func:`temporal_median`; ``byteorder`` is passed to
    :class:`~aiflat_local.io.ser.SerReader`.

    Returns
    -------
    image : numpy.ndarray
        float32 ``(H, W)`` or ``(H, W, 3)``, see :func:`temporal_median`.
    provenance : dict
        ``path``, ``method``, ``n_frames_in_file``, ``frames_used``,
        ``start``/``stop``/``step`` (resolved, ``stop`` exclusive), ``width``,
        ``height``, ``color_id``, ``color``, ``dtype``, ``byteorder`` and the
        reader's ``warnings``: enough to record in ``report.json`` or a FITS
        header.
    """
    with SerReader(path, byteorder=byteorder) as reader:
        frames = _frame_indices(reader.n_frames, start, stop, step, str(path))
        image = temporal_median(
            reader, start=start, stop=stop, step=step, max_memory_mb=max_memory_mb,
            workers=workers, progress=progress,
        )
        provenance = {
            "path": str(Path(path)),
            "method": "temporal median (exact, numpy.median semantics)",
            "n_frames_in_file": reader.n_frames,
            "frames_used": len(frames),
            "start": frames.start,
            "stop": frames.stop,
            "step": frames.step,
            "width": reader.width,
            "height": reader.height,
            "color_id": reader.header.color_id,
            "color": reader.header.color_name,
            "dtype": str(reader.dtype),
            "byteorder": reader.byteorder,
            "warnings": list(reader.warnings),
        }
    return image, provenance


def balance_cfa(image: np.ndarray, color_id: int) -> np.ndarray:
    """Even out the four sites of a Bayer/CMY mosaic so it looks monochrome.

    A raw one-shot-colour mosaic has a 2 x 2 checkerboard of different
    responses (R, G, G, B under a solar filter can differ by factors of ten),
    which a masker would take for structure. Each of the four CFA sites
    (``image[i::2, j::2]`` for ``i, j`` in 0, 1) is divided by its own median, so
    the result is near 1.0 on the disk and the pattern disappears.

    This changes nothing downstream: the flat is a ratio
    ``reference / inpainted`` of two images of the same mosaic, and a per-site
    constant cancels in it, so the maskers and inpainters can work on the
    balanced view while the flat stays in ADU terms of the mosaic.

    Parameters
    ----------
    image
        2-D mosaic ``(H, W)`` (any real dtype), sensor orientation.
    color_id
        SER ColorID. Mosaics (8-11 Bayer, 16-19 CMY) are balanced; anything
        else (0 mono, 100/101 RGB) is returned unchanged (as float32).

    Returns
    -------
    numpy.ndarray
        float32, same shape. A site whose median is not a finite positive
        number (e.g. a dark frame) is left unscaled.
    """
    img = np.asarray(image)
    if int(color_id) not in MOSAIC_IDS:
        return img.astype(np.float32, copy=False)
    if img.ndim != 2:
        raise InputError(f"a CFA mosaic (ColorID {color_id}) must be 2-D, got shape {img.shape}")
    out = img.astype(np.float32, copy=True)
    for i in (0, 1):
        for j in (0, 1):
            site = out[i::2, j::2]
            if site.size == 0:
                continue
            med = float(np.median(site))
            if np.isfinite(med) and med > 0:
                site /= np.float32(med)
    return out


def reference_to_mono(image: np.ndarray) -> np.ndarray:
    """Collapse an RGB reference ``(H, W, 3)`` to ``(H, W)`` by the mean of its channels.

    A 2-D image is returned as is (as float32). Dust attenuates all channels
    alike to first order, so one flat computed on the mean is applied to every
    channel by :func:`aiflat_local.calibrate.apply_flat`.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        return img.astype(np.float32, copy=False)
    if img.ndim == 3 and img.shape[2] == 3:
        return img.mean(axis=2, dtype=np.float32)
    raise InputError(f"expected an (H, W) or (H, W, 3) image, got shape {img.shape}")

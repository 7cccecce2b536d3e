"""The reference image of a video: an exact temporal median with bounded memory.

The reference is the per-pixel median of the selected frames. Dust shadows sit
still on the sensor while the Sun drifts and the seeing boils, so the median
keeps the shadows and smooths everything that moves.

How it is computed
------------------
The original cloud tool read every frame into a Python list and called
``np.median(np.array(frames), axis=0)``: about three copies of the whole video
in memory and a partition along a strided axis. Here the frame rectangle is cut
into *tiles* (bands of whole rows, or pieces of one row for very long videos),
and each tile is read across all selected frames straight from the memory-mapped
SER into a pixel-major buffer ``(pixels, frames)``. That buffer is partitioned
in place along its contiguous last axis (numpy's single-``kth`` partition,
which is SIMD-accelerated on x86), and the median is read off it. Tiles run on
a small thread pool: numpy releases the GIL while copying and partitioning, so
two workers give close to two times the speed of one.

The working memory is bounded by ``max_memory_mb`` whatever the number of
frames (the tile simply gets narrower); the result itself, ``H x W x 4`` bytes,
comes on top.

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
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .io.ser import MOSAIC_IDS, SerReader

__all__ = ["temporal_median", "read_reference", "balance_cfa", "reference_to_mono"]

#: Target size of one tile's pixel-major buffer. Tiles of a few MiB keep the
#: transposing copy and the partition in the CPU caches: on a 1920 x 1200 x 200
#: uint16 video, 1-4 MiB tiles ran 1.5-2x faster than 6-12 MiB ones (2-core
#: AMD EPYC, numpy 2.4). Lowered further when ``max_memory_mb`` asks for less.
_TARGET_TILE_BYTES = 2 * 2**20
#: Target size of one frame-chunk slab copied into a tile in one numpy call.
_TARGET_SLAB_BYTES = 512 * 2**10


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


def _plan_tiles(
    height: int, row_len: int, n: int, itemsize: int, budget: int, workers: int
) -> tuple[int, int]:
    """Choose ``(rows, cols)`` of one tile; ``cols < row_len`` only when ``rows == 1``.

    A worker holds one tile buffer of ``rows * cols * n * itemsize`` bytes plus
    a float64 row of results per pixel and one frame-chunk slab.
    """
    per_worker = budget // workers
    per_pixel = n * itemsize + 8 + 4  # buffer column + float64 result + float32 copy
    # Leave a quarter of each worker's share for the frame-chunk slab.
    max_px = max(1, (per_worker * 3 // 4) // per_pixel)
    want_px = max(1, _TARGET_TILE_BYTES // (n * itemsize))
    px = min(max_px, want_px)
    if px >= row_len:
        return min(height, px // row_len), row_len
    return 1, px


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
        An open :class:`~aiflat_local.io.ser.SerReader`.
    start, stop, step
        Frame selection with Python slice semantics (negative ``start``/``stop``
        count from the end; ``step >= 1``).
    max_memory_mb
        Upper bound, in MiB, on the working memory (tile buffers of all
        workers); it does not grow with the number of frames. The returned
        image (``H * W * 4`` bytes, times 3 for RGB) comes on top.
    workers
        Threads working on different tiles (numpy releases the GIL while
        copying and partitioning). 1 runs everything in the calling thread.
    progress
        Show a tqdm progress bar over tiles on stderr.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` (mono or raw Bayer mosaic) or ``(H, W, 3)`` (RGB
        order for RGB/BGR videos), in sensor orientation, in the input's ADU.
        Bit-identical to ``np.median(np.stack(frames), axis=0).astype(np.float32)``.

    Raises
    ------
    InputError
        The selection is empty, or an argument is out of range.
    """
    where = str(getattr(reader, "path", "SER"))
    frames = _frame_indices(reader.n_frames, start, stop, step, where)
    if not (isinstance(workers, (int, np.integer)) and workers >= 1):
        raise InputError(f"workers must be an integer >= 1, not {workers!r}")
    try:
        budget = int(float(max_memory_mb) * 2**20)
    except (TypeError, ValueError):
        raise InputError(f"max_memory_mb must be a number, not {max_memory_mb!r}") from None
    if budget <= 0:
        raise InputError(f"max_memory_mb must be > 0, not {max_memory_mb!r}")

    n = len(frames)
    first, fstep = frames.start, frames.step
    height, width = reader.height, reader.width
    planes = 3 if len(reader.frame_shape) == 3 else 1
    row_len = width * planes
    itemsize = reader.dtype.itemsize
    rows, cols = _plan_tiles(height, row_len, n, itemsize, budget, int(workers))
    tiles = [
        (r0, min(r0 + rows, height), c0, min(c0 + cols, row_len))
        for r0 in range(0, height, rows)
        for c0 in range(0, row_len, cols)
    ]
    tile_px = rows * cols
    # Frames per copy call: a slab of about _TARGET_SLAB_BYTES, and the band
    # that SerReader.band materialises (a full-width copy when the file needs
    # byte swapping or BGR reordering) within a quarter of a worker's share.
    slab = max(1, _TARGET_SLAB_BYTES // (tile_px * itemsize))
    band_cap = max(1, (budget // int(workers) // 4) // (rows * row_len * itemsize))
    chunk = int(min(n, slab, band_cap))

    out = np.empty((height, row_len), dtype=np.float32)
    local = threading.local()
    half = n // 2
    even = n % 2 == 0

    def work(tile: tuple[int, int, int, int]) -> None:
        r0, r1, c0, c1 = tile
        npx = (r1 - r0) * (c1 - c0)
        buf = getattr(local, "buf", None)
        if buf is None or buf.shape[0] < npx:
            buf = local.buf = np.empty((tile_px, n), dtype=reader.dtype)
        t = buf[:npx]
        t3 = t.reshape(r1 - r0, c1 - c0, n)
        for f0 in range(0, n, chunk):
            f1 = min(n, f0 + chunk)
            sel = slice(first + f0 * fstep, first + (f1 - 1) * fstep + 1, fstep)
            band = reader.band(sel, r0, r1).reshape(f1 - f0, r1 - r0, row_len)
            t3[:, :, f0:f1] = band[:, :, c0:c1].transpose(1, 2, 0)
        t.partition(half, axis=-1)
        upper = t[:, half]
        if even:
            lower = t[:, :half].max(axis=-1)
            med = (lower.astype(np.float64) + upper) / 2.0  # as np.median: float64 mean
        else:
            med = upper
        out[r0:r1, c0:c1] = med.reshape(r1 - r0, c1 - c0)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tiles), desc="temporal median", unit="tile", leave=False)
    try:
        if workers == 1 or len(tiles) == 1:
            for tile in tiles:
                work(tile)
                if bar is not None:
                    bar.update()
        else:
            with ThreadPoolExecutor(max_workers=int(workers)) as pool:
                for _ in pool.map(work, tiles):
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    return out.reshape(height, width, 3) if planes == 3 else out.reshape(height, width)


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

"""SER video reading and writing, memory-mapped and streaming.

The SER format (Lucam Recorder, used by FireCapture, SharpCap, Genika, ...) is a
178-byte little-endian header followed by ``FrameCount`` raw frames and an
optional trailer of one int64 timestamp per frame.

Conventions
-----------
- Frames are returned in **sensor orientation**: row 0 is the first row stored
  in the file (the top of the sensor for nearly every capture program).
- Mono (ColorID 0) frames are ``(height, width)``.
- Bayer and CMY mosaics (ColorID 8-19) are also ``(height, width)``: the raw
  mosaic, one sample per pixel. A flat field is a per-pixel gain, so it is
  estimated and applied on the mosaic itself, as PixInsight and Siril do for
  one-shot-colour cameras (see :func:`aiflat_local.reference.balance_cfa` for
  the near-monochrome view the maskers see).
- RGB (100) and BGR (101) frames are ``(height, width, 3)`` in **RGB** order.
- 8-bit data is ``uint8``; 9-16-bit data is ``uint16`` in native byte order.

Real-world quirks handled here
------------------------------
- The ``LittleEndian`` flag is written inverted by most capture programs (0 with
  little-endian data). ``byteorder="auto"`` (the default) decides from the data
  itself: the byte order whose image is smoother wins; ties go little-endian.
- ``PixelDepthPerPlane`` is often wrong (e.g. 12 or 14 for 16-bit data): only
  ``<= 8`` versus ``> 8`` is used, to pick the sample size.
- Crashed captures leave ``FrameCount = 0`` or a short last frame: every whole
  frame in the file is recovered and a warning says so (``reader.warnings``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import InputError, OutputError
from ._atomic import atomic_path

HEADER_SIZE = 178
FILE_ID = b"LUCAM-RECORDER"
_HEADER_STRUCT = struct.Struct("<14s7i40s40s40sqq")

COLOR_NAMES = {
    0: "MONO",
    8: "BAYER_RGGB", 9: "BAYER_GRBG", 10: "BAYER_GBRG", 11: "BAYER_BGGR",
    16: "BAYER_CYYM", 17: "BAYER_YCMY", 18: "BAYER_YMCY", 19: "BAYER_MYYC",
    100: "RGB", 101: "BGR",
}
MOSAIC_IDS = frozenset({8, 9, 10, 11, 16, 17, 18, 19})


@dataclass(frozen=True)
class SerHeader:
    """The 178-byte SER header, as stored (``frame_count`` as written, not as recovered)."""

    color_id: int
    little_endian_flag: int
    width: int
    height: int
    pixel_depth: int
    frame_count: int
    lu_id: int = 0
    observer: str = ""
    instrument: str = ""
    telescope: str = ""
    date_time: int = 0
    date_time_utc: int = 0

    @property
    def planes(self) -> int:
        """Samples per pixel: 3 for RGB/BGR, else 1."""
        return 3 if self.color_id in (100, 101) else 1

    @property
    def bytes_per_sample(self) -> int:
        return 1 if self.pixel_depth <= 8 else 2

    @property
    def frame_bytes(self) -> int:
        return self.width * self.height * self.planes * self.bytes_per_sample

    @property
    def color_name(self) -> str:
        return COLOR_NAMES.get(self.color_id, f"UNKNOWN({self.color_id})")

    def pack(self) -> bytes:
        def text(s: str) -> bytes:
            return s.encode("latin-1", "replace")[:40].ljust(40, b"\0")

        return _HEADER_STRUCT.pack(
            FILE_ID, self.lu_id, self.color_id, self.little_endian_flag, self.width,
            self.height, self.pixel_depth, self.frame_count, text(self.observer),
            text(self.instrument), text(self.telescope), self.date_time, self.date_time_utc,
        )


def parse_header(raw: bytes, path: str | os.PathLike = "<bytes>") -> SerHeader:
    """Parse and validate a SER header; raise :class:`InputError` on anything malformed."""
    if len(raw) < HEADER_SIZE:
        if raw[:14] == FILE_ID or 0 < len(raw) < 14 and FILE_ID.startswith(raw):
            raise InputError(f"{path}: truncated SER header ({len(raw)} of {HEADER_SIZE} bytes)")
        what = "empty file" if not raw else "too short, no LUCAM-RECORDER signature"
        raise InputError(f"{path}: not a SER file ({what})")
    fields = _HEADER_STRUCT.unpack(raw[:HEADER_SIZE])
    if fields[0] != FILE_ID:
        raise InputError(f"{path}: not a SER file (no LUCAM-RECORDER signature)")

    def text(b: bytes) -> str:
        return b.split(b"\0", 1)[0].decode("latin-1").strip()

    header = SerHeader(
        lu_id=fields[1], color_id=fields[2], little_endian_flag=fields[3], width=fields[4],
        height=fields[5], pixel_depth=fields[6], frame_count=fields[7], observer=text(fields[8]),
        instrument=text(fields[9]), telescope=text(fields[10]), date_time=fields[11],
        date_time_utc=fields[12],
    )
    if header.color_id not in COLOR_NAMES:
        raise InputError(
            f"{path}: unknown SER ColorID {header.color_id} "
            f"(known: {', '.join(map(str, sorted(COLOR_NAMES)))})"
        )
    if not (0 < header.width <= 65536 and 0 < header.height <= 65536):
        raise InputError(f"{path}: invalid SER frame size {header.width} x {header.height}")
    if not 1 <= header.pixel_depth <= 16:
        raise InputError(f"{path}: invalid SER PixelDepthPerPlane {header.pixel_depth} (1-16)")
    if header.frame_count < 0:
        raise InputError(f"{path}: invalid SER FrameCount {header.frame_count}")
    return header


def _roughness(frame: np.ndarray) -> float:
    """Mean absolute difference between horizontal neighbours (a smoothness score)."""
    f = frame.astype(np.float64)
    return float(np.mean(np.abs(np.diff(f, axis=1)))) if f.shape[1] > 1 else 0.0


class SerReader:
    """Memory-mapped SER reader that never loads the whole video.

    Parameters
    ----------
    path
        The SER file.
    byteorder
        ``"auto"`` (decide 16-bit byte order from the data), ``"little"``,
        ``"big"``, or ``"flag"`` (trust the header's LittleEndian field as the
        specification defines it, 1 = little-endian).

    Attributes
    ----------
    header : SerHeader
    n_frames : int
        Whole frames available (may be fewer than ``header.frame_count``).
    timestamps : numpy.ndarray or None
        int64 timestamps (100 ns ticks since year 1) from the trailer, if present.
    warnings : list of str
        What was recovered or guessed (short file, FrameCount 0, byte order).
    """

    def __init__(self, path: str | os.PathLike, *, byteorder: str = "auto") -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, expected a SER file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            raw = fh.read(HEADER_SIZE)
        self.header = parse_header(raw, self.path)
        self.warnings: list[str] = []
        h = self.header
        available = (size - HEADER_SIZE) // h.frame_bytes
        n = h.frame_count
        if n == 0:
            # The trailer, if any, would be counted as frame data here: only a
            # whole number of frames plus exactly n*8 trailer bytes is a trailer.
            n = available
            for k in range(available, 0, -1):
                if HEADER_SIZE + k * h.frame_bytes + 8 * k == size:
                    n = k
                    break
            self.warnings.append(
                f"header FrameCount is 0; recovered {n} whole frame(s) from the file size"
            )
        elif n > available:
            self.warnings.append(
                f"header says {h.frame_count} frames but the file holds {available} whole "
                f"frame(s) (truncated capture); using {available}"
            )
            n = available
        if n <= 0:
            raise InputError(f"{self.path}: SER file holds no whole frame")
        self.n_frames = int(n)
        self.height, self.width, self.planes = h.height, h.width, h.planes

        trailer_at = HEADER_SIZE + self.n_frames * h.frame_bytes
        self.timestamps: np.ndarray | None = None
        if self.n_frames == h.frame_count and size >= trailer_at + 8 * self.n_frames:
            ts = np.fromfile(self.path, dtype="<i8", count=self.n_frames, offset=trailer_at)
            self.timestamps = ts

        base = np.uint8 if h.bytes_per_sample == 1 else np.uint16
        if h.bytes_per_sample == 1:
            file_dtype = np.dtype(np.uint8)
            self.byteorder = "little"
        else:
            file_dtype = self._decide_byteorder(byteorder, size)
        self.dtype = np.dtype(base)
        shape = (self.n_frames, h.height, h.width) + ((3,) if self.planes == 3 else ())
        self._mm = np.memmap(self.path, dtype=file_dtype, mode="r", offset=HEADER_SIZE, shape=shape)

    def _decide_byteorder(self, byteorder: str, size: int) -> np.dtype:
        h = self.header
        if byteorder == "little":
            self.byteorder = "little"
        elif byteorder == "big":
            self.byteorder = "big"
        elif byteorder == "flag":
            self.byteorder = "little" if h.little_endian_flag == 1 else "big"
        elif byteorder == "auto":
            count = h.width * h.height * h.planes
            first = np.fromfile(self.path, dtype="<u2", count=count, offset=HEADER_SIZE)
            first = first.reshape(h.height, h.width * h.planes)
            le = _roughness(first[:, :: h.planes])
            be = _roughness(first.byteswap()[:, :: h.planes])
            self.byteorder = "big" if be < 0.5 * le else "little"
            flag_says = "little" if h.little_endian_flag == 1 else "big"
            if self.byteorder != flag_says and h.little_endian_flag not in (0, 1):
                self.warnings.append(f"odd LittleEndian flag {h.little_endian_flag}")
            if self.byteorder == "big":
                self.warnings.append("16-bit samples detected as big-endian")
        else:
            raise ValueError(f"byteorder must be auto, little, big or flag, not {byteorder!r}")
        return np.dtype("<u2" if self.byteorder == "little" else ">u2")

    # -- access ---------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_frames

    @property
    def is_mosaic(self) -> bool:
        return self.header.color_id in MOSAIC_IDS

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return self._mm.shape[1:]

    def _native(self, a: np.ndarray) -> np.ndarray:
        # Always a copy in native byte order: a view would die with the memory map.
        if self.header.color_id == 101:
            a = a[..., ::-1]
        return np.array(a, dtype=self.dtype, order="C", copy=True)

    def frame(self, index: int) -> np.ndarray:
        """Frame *index* as a native-dtype array (a copy): ``(H, W)`` or ``(H, W, 3)`` RGB."""
        if not -self.n_frames <= index < self.n_frames:
            raise IndexError(f"frame {index} out of range 0..{self.n_frames - 1}")
        return self._native(self._mm[index])

    def band(self, frames: slice | np.ndarray, row_start: int, row_stop: int) -> np.ndarray:
        """Rows ``row_start:row_stop`` of the selected frames, ``(n, rows, W[, 3])``, native dtype."""
        return self._native(self._mm[frames, row_start:row_stop])

    def iter_frames(self, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[np.ndarray]:
        """Yield frames one at a time (native dtype copies)."""
        for i in range(*slice(start, stop, step).indices(self.n_frames)):
            yield self.frame(i)

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None and getattr(mm, "_mmap", None) is not None:
            mm._mmap.close()
        self._mm = None  # type: ignore[assignment]

    def __enter__(self) -> "SerReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SerWriter:
    """Stream frames into a new SER file; it appears under its name only when closed cleanly.

    Data is written little-endian with ``LittleEndian = 0``, which is what
    FireCapture/SharpCap write and what Siril, PIPP and AutoStakkert read as
    little-endian. Pass ``like=reader.header`` to copy ColorID, depth and the
    text fields of an input. ``timestamps`` (one int64 per frame) are written as
    the trailer.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        width: int,
        height: int,
        dtype: np.dtype | type = np.uint16,
        color_id: int = 0,
        pixel_depth: int | None = None,
        like: SerHeader | None = None,
        timestamps: Iterable[int] | None = None,
        protect: tuple = (),
    ) -> None:
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise ValueError(f"SER stores uint8 or uint16 samples, not {dtype}")
        depth = pixel_depth or (like.pixel_depth if like else 8 * dtype.itemsize)
        if (depth <= 8) != (dtype.itemsize == 1):
            depth = 8 * dtype.itemsize
        base = like or SerHeader(color_id, 0, width, height, depth, 0)
        self.header = replace(
            base, color_id=color_id if like is None else like.color_id, little_endian_flag=0,
            width=width, height=height, pixel_depth=depth, frame_count=0,
        )
        self.dtype = dtype
        self._shape = (height, width) + ((3,) if self.header.planes == 3 else ())
        self._timestamps = None if timestamps is None else np.asarray(list(timestamps), dtype="<i8")
        self._count = 0
        self._ctx = atomic_path(path, protect=protect)
        self._tmp = self._ctx.__enter__()
        self._fh = open(self._tmp, "wb")
        self._fh.write(self.header.pack())
        self.path = Path(path)

    def write(self, frame: np.ndarray) -> None:
        """Append one frame (``(H, W)`` or ``(H, W, 3)`` RGB order, exactly the writer's dtype)."""
        frame = np.asarray(frame)
        if frame.shape != self._shape:
            raise ValueError(f"frame shape {frame.shape} != {self._shape}")
        if frame.dtype != self.dtype:
            raise ValueError(f"frame dtype {frame.dtype} != {self.dtype} (convert explicitly)")
        if self.header.color_id == 101:
            frame = frame[..., ::-1]
        data = np.ascontiguousarray(frame, dtype=self.dtype.newbyteorder("<"))
        self._fh.write(memoryview(data).cast("B"))  # no intermediate bytes copy
        self._count += 1

    def close(self) -> None:
        """Finish the header (frame count), append the trailer, and rename into place."""
        if self._fh is None:
            return
        try:
            if self._timestamps is not None and len(self._timestamps) == self._count:
                self._fh.write(self._timestamps.astype("<i8").tobytes())
            self._fh.seek(0)
            self._fh.write(replace(self.header, frame_count=self._count).pack())
            self._fh.close()
            self._fh = None
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        """Discard the partial file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            try:
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass

    def __enter__(self) -> "SerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_ser(path, frames: Iterable[np.ndarray], **kwargs) -> Path:
    """Write an iterable of frames to *path* (see :class:`SerWriter` for options)."""
    it = iter(frames)
    first = np.asarray(next(it))
    kwargs.setdefault("dtype", first.dtype)
    with SerWriter(path, width=first.shape[1], height=first.shape[0], **kwargs) as w:
        w.write(first)
        for f in it:
            w.write(f)
    return Path(path)

"""Reading and writing images and masks, with orientation handled at the edges.

Inside the pipeline every image is a float32 array in **sensor orientation**:
row 0 is the first row of a SER frame (the top of the sensor). On disk:

=========  =====================================================================
format     row order on disk
=========  =====================================================================
SER        sensor order (top row first), see :mod:`aiflat_local.io.ser`
FITS       bottom-up, the FITS convention, with ``ROWORDER = 'BOTTOM-UP'``; a file
           with ``ROWORDER = 'TOP-DOWN'`` is read as stored; a file without the
           keyword is read as bottom-up (FITS convention). This is the layout that
           Siril (which turns SER frames bottom-up on load) lines up with a SER.
TIFF       top row first (TIFF orientation 1)
XISF       top row first (XISF's origin is the top-left corner)
PNG, JPEG  top row first
=========  =====================================================================

Formats are recognised by their magic bytes first and the file extension second.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ._atomic import atomic_path, check_writable_dir

__all__ = [
    "ImageInfo", "detect_format", "read_image", "write_fits", "write_tiff", "write_xisf",
    "write_png", "read_mask", "write_mask", "atomic_path", "check_writable_dir",
]

_MAGIC = [
    (b"LUCAM-RECORDER", "ser"),
    (b"SIMPLE  =", "fits"),
    (b"XISF0100", "xisf"),
    (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"II+\x00", "tiff"), (b"MM\x00+", "tiff"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
]
_EXTENSIONS = {
    ".ser": "ser", ".fits": "fits", ".fit": "fits", ".fts": "fits", ".xisf": "xisf",
    ".tif": "tiff", ".tiff": "tiff", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg",
}


@dataclass
class ImageInfo:
    """Where an image came from and how it was stored."""

    path: str
    format: str
    dtype: str  # the on-disk sample type, e.g. "uint16", "float32"
    shape: tuple[int, ...]
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def integer_max(self) -> float | None:
        """Largest value of the on-disk integer type, or None for float data."""
        dt = np.dtype(self.dtype)
        return float(np.iinfo(dt).max) if dt.kind in "ui" else None


def detect_format(path: str | os.PathLike) -> str:
    """Return ``ser|fits|xisf|tiff|png|jpeg`` from magic bytes, else from the extension."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a file")
    with open(path, "rb") as fh:
        head = fh.read(16)
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt == "ser" and head and b"LUCAM-RECORDER".startswith(head[:14]):
        raise InputError(f"{path}: truncated SER header ({path.stat().st_size} bytes)")
    if fmt is None:
        raise InputError(f"{path}: unknown file format (expected SER, FITS, XISF, TIFF, PNG or JPEG)")
    raise InputError(f"{path}: not a valid {fmt.upper()} file (its signature is missing)")


def _check_finite(data: np.ndarray, path: Path) -> None:
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(f"{path}: contains {bad} NaN/Inf pixel(s); fix or replace them first")


def _finish(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[..., 0]
    if data.ndim == 3 and data.shape[2] == 4:  # drop alpha
        data = data[..., :3]
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] != 3):
        raise InputError(f"{path}: unsupported image shape {data.shape} (expected H x W or H x W x 3)")
    if min(data.shape[:2]) < 2:
        raise InputError(f"{path}: image is too small ({data.shape[1]} x {data.shape[0]})")
    _check_finite(data, path)
    return np.ascontiguousarray(data, dtype=np.float32)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, ImageInfo]:
    """Read a still image as float32 in sensor orientation.

    Returns ``(image, info)``; ``image`` is ``(H, W)`` or ``(H, W, 3)`` RGB, in the
    file's own units (integers are not rescaled: a uint16 65535 stays 65535.0).
    A SER file gives its first frame. Raises :class:`InputError` for anything
    unreadable, including NaN/Inf pixels.
    """
    path = Path(path)
    fmt = detect_format(path)
    header: dict[str, Any] = {}
    try:
        if fmt == "ser":
            from .ser import SerReader

            with SerReader(path) as r:
                data = r.frame(0)
        elif fmt == "fits":
            data, header = _read_fits(path)
        elif fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(path) as tf:
                data = tf.asarray()
                desc = tf.pages.first.description
                if desc:
                    header["description"] = desc
                if data.ndim == 3 and data.shape[0] == 3 and data.shape[2] != 3:
                    data = np.moveaxis(data, 0, -1)
        elif fmt == "xisf":
            from xisf import XISF

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                xf = XISF(str(path))
                data = xf.read_image(0)
                keywords = xf.get_images_metadata()[0].get("FITSKeywords", {})
            header.update({k: v[0]["value"] for k, v in keywords.items() if v})
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode in ("P", "LA", "PA", "CMYK", "YCbCr", "1"):
                    im = im.convert("RGB" if im.mode in ("P", "CMYK", "YCbCr") else "L")
                data = np.array(im)
    except InputError:
        raise
    except Exception as exc:  # a malformed file of a known kind
        raise InputError(f"{path}: cannot read {fmt.upper()} file ({type(exc).__name__}: {exc})") from None
    dtype = str(data.dtype)
    image = _finish(np.asarray(data), path)
    return image, ImageInfo(str(path), fmt, dtype, image.shape, header)


def _read_fits(path: Path) -> tuple[np.ndarray, dict]:
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        hdu = next((h for h in hdul if getattr(h, "data", None) is not None and h.data.ndim >= 2), None)
        if hdu is None:
            raise InputError(f"{path}: FITS file has no image data")
        data = np.array(hdu.data)
        header = {k: hdu.header[k] for k in hdu.header if k and k not in ("COMMENT", "HISTORY")}
    if data.ndim == 3 and data.shape[0] == 3:
        data = np.moveaxis(data, 0, -1)
    elif data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if str(header.get("ROWORDER", "BOTTOM-UP")).strip().upper() != "TOP-DOWN":
        data = data[::-1]
    return data, header


# -- writers ------------------------------------------------------------------

def _fits_value(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def write_fits(path: str | os.PathLike, image: np.ndarray, header: dict[str, Any] | None = None,
               *, protect: tuple = ()) -> Path:
    """Write *image* (sensor orientation) as FITS, bottom-up with ``ROWORDER = 'BOTTOM-UP'``.

    ``header`` keys longer than 8 characters or non-ASCII values go in as
    HIERARCH cards / strings (provenance). float arrays are stored float32;
    integer arrays keep their type (uint16 via BZERO, as astropy does).
    """
    from astropy.io import fits

    data = np.asarray(image)
    if data.dtype.kind == "f":
        data = data.astype(np.float32, copy=False)
    stored = data[::-1]
    if stored.ndim == 3:
        stored = np.moveaxis(stored, -1, 0)
    hdu = fits.PrimaryHDU(np.ascontiguousarray(stored))
    hdu.header["ROWORDER"] = ("BOTTOM-UP", "first stored row is the bottom of the image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        for key, value in (header or {}).items():
            card_key = key if len(key) <= 8 and key.isupper() else f"HIERARCH {key}"
            text = _fits_value(value)
            if isinstance(text, str):
                text = text.encode("ascii", "replace").decode()[:60]
            hdu.header[card_key] = text
    with atomic_path(path, protect=protect) as tmp:
        hdu.writeto(tmp, overwrite=True, output_verify="silentfix")
    return Path(path)


def write_tiff(path: str | os.PathLike, image: np.ndarray, *, description: str = "",
               protect: tuple = ()) -> Path:
    """Write *image* (top row first) as TIFF, keeping its dtype (float32 or uint8/16)."""
    import tifffile

    with atomic_path(path, protect=protect) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(image), description=description or None,
                         photometric="rgb" if np.ndim(image) == 3 else "minisblack",
                         metadata=None)
    return Path(path)


def write_xisf(path: str | os.PathLike, image: np.ndarray, *, properties: dict[str, Any] | None = None,
               protect: tuple = ()) -> Path:
    """Write *image* (top row first) as XISF; float32 data is in PixInsight's [0, 1] range."""
    from xisf import XISF

    data = np.asarray(image)
    data = data[..., None] if data.ndim == 2 else data
    meta = {"FITSKeywords": {k[:8].upper(): [{"value": str(_fits_value(v)), "comment": ""}]
                             for k, v in (properties or {}).items()}}
    with atomic_path(path, protect=protect) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            XISF.write(str(tmp), np.ascontiguousarray(data), creator_app="aiflat-local",
                       image_metadata=meta)
    return Path(path)


def write_png(path: str | os.PathLike, image: np.ndarray, *, protect: tuple = ()) -> Path:
    """Write a uint8/uint16 array (or (H, W, 3) uint8) as PNG, top row first."""
    from PIL import Image

    data = np.asarray(image)
    if data.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG needs uint8 or uint16 data, not {data.dtype}")
    with atomic_path(path, protect=protect) as tmp:
        Image.fromarray(np.ascontiguousarray(data)).save(tmp, format="PNG")
    return Path(path)


def write_mask(path: str | os.PathLike, mask: np.ndarray, *, protect: tuple = ()) -> Path:
    """Write a boolean mask as an 8-bit PNG: 255 = dust, 0 = clean."""
    return write_png(path, np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8),
                     protect=protect)


def read_mask(path: str | os.PathLike, *, threshold: float = 0.5) -> np.ndarray:
    """Read a mask image as booleans (True = dust).

    Integer images are thresholded at ``threshold`` x the type's maximum (128 for
    8-bit, which also handles the soft edges of JPEG-decoded masks); float images
    at ``threshold``. Colour masks use their mean.
    """
    image, info = read_image(path)
    if image.ndim == 3:
        image = image.mean(axis=2)
    top = info.integer_max or 1.0
    return image >= threshold * top if info.integer_max else image >= threshold


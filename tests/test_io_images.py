"""Image and mask I/O: orientation round trips, format detection, bad files."""

import numpy as np
import pytest
from astropy.io import fits

from aiflat_local.errors import InputError
from aiflat_local.io import (
    detect_format, read_image, read_mask, write_fits, write_mask, write_png, write_tiff, write_xisf,
)


@pytest.fixture
def asymmetric():
    """Top rows bright, bottom rows dark, a marker at the top-left: orientation errors cannot hide."""
    img = np.linspace(1.0, 0.0, 20, dtype=np.float32)[:, None] * np.ones((20, 30), np.float32)
    img[1, 2] = 5.0
    return img


@pytest.mark.parametrize("ext,writer", [("fits", write_fits), ("tif", write_tiff), ("xisf", write_xisf)])
def test_float_round_trip_keeps_sensor_orientation(tmp_path, asymmetric, ext, writer):
    path = writer(tmp_path / f"a.{ext}", asymmetric)
    back, info = read_image(path)
    assert info.format == {"tif": "tiff"}.get(ext, ext)
    assert np.array_equal(back, asymmetric)
    assert back[1, 2] == 5.0


def test_fits_is_stored_bottom_up_with_roworder(tmp_path, asymmetric):
    write_fits(tmp_path / "a.fits", asymmetric)
    with fits.open(tmp_path / "a.fits") as hdul:
        assert hdul[0].header["ROWORDER"] == "BOTTOM-UP"
        stored = hdul[0].data
    # Siril convention: the first stored row is the bottom of the SER frame.
    assert np.array_equal(stored[0], asymmetric[-1]) and stored[-2, 2] == 5.0


def test_fits_top_down_and_keywordless_files(tmp_path, asymmetric):
    fits.PrimaryHDU(asymmetric, header=fits.Header([("ROWORDER", "TOP-DOWN")])).writeto(tmp_path / "td.fits")
    assert np.array_equal(read_image(tmp_path / "td.fits")[0], asymmetric)
    fits.PrimaryHDU(asymmetric[::-1].copy()).writeto(tmp_path / "plain.fits")  # FITS convention, no keyword
    assert np.array_equal(read_image(tmp_path / "plain.fits")[0], asymmetric)


def test_png_uint16_and_mask_round_trip(tmp_path, asymmetric):
    img16 = (asymmetric / 5 * 65535).astype(np.uint16)
    write_png(tmp_path / "a.png", img16)
    back, info = read_image(tmp_path / "a.png")
    assert info.dtype == "uint16" and np.array_equal(back, img16.astype(np.float32))
    mask = asymmetric > 0.5
    write_mask(tmp_path / "m.png", mask)
    raw, _ = read_image(tmp_path / "m.png")
    assert set(np.unique(raw)) <= {0.0, 255.0}
    assert np.array_equal(read_mask(tmp_path / "m.png"), mask)


def test_jpeg_and_rgb(tmp_path):
    from PIL import Image

    rgb = np.zeros((16, 20, 3), np.uint8)
    rgb[:8] = (200, 100, 50)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    back, info = read_image(tmp_path / "a.jpg")
    assert info.format == "jpeg" and back.shape == (16, 20, 3)
    assert abs(back[2, 2, 0] - 200) < 6 and back[12, 2, 0] < 10


def test_detection_by_magic_bytes_not_extension(tmp_path, asymmetric):
    write_fits(tmp_path / "a.fits", asymmetric)
    (tmp_path / "disguised.png").write_bytes((tmp_path / "a.fits").read_bytes())
    assert detect_format(tmp_path / "disguised.png") == "fits"


@pytest.mark.parametrize("name,content,message", [
    ("x.fits", b"garbage" * 10, "not a valid FITS"),
    ("x.weird", b"garbage" * 10, "unknown file format"),
    ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "cannot read PNG"),
])
def test_bad_files_are_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_image(tmp_path / name)


def test_nan_in_fits_is_refused(tmp_path, asymmetric):
    asymmetric[3, 3] = np.nan
    asymmetric[4, 4] = np.inf
    write_fits(tmp_path / "nan.fits", asymmetric)
    with pytest.raises(InputError, match="2 NaN/Inf"):
        read_image(tmp_path / "nan.fits")


def test_missing_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "nope.fits")
    with pytest.raises(InputError, match="is a directory"):
        read_image(tmp_path)


def test_writers_are_atomic_and_protect_inputs(tmp_path, asymmetric):
    from aiflat_local.errors import OutputError

    path = write_fits(tmp_path / "in.fits", asymmetric)
    before = path.read_bytes()
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        write_fits(path, asymmetric * 2, protect=(path,))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fits"]

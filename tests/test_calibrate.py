"""Tests for aiflat_local.calibrate: exact, counted, never-wrapping flat application."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import aiflat_local.calibrate as calibrate
from aiflat_local.calibrate import (
    CalibrationStats,
    apply_flat,
    calibrate_image,
    calibrate_ser,
)
from aiflat_local.errors import InputError, OutputError
from aiflat_local.io.ser import SerHeader, SerReader, SerWriter, write_ser

H, W = 48, 40


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dust_flat(seed=0, shape=(H, W), low=0.5, rim=1.05):
    """1.0 everywhere except a dark blob (down to ``low``) with a bright rim pixel row."""
    rng = np.random.default_rng(seed)
    flat = np.ones(shape, np.float32)
    flat[10:20, 12:25] = rng.uniform(low, 1.0, (10, 13)).astype(np.float32)
    flat[20, 12:25] = rim
    return flat


def _frames(n, seed, shape=(H, W), lo=1000, hi=50000, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, shape).astype(dtype) for _ in range(n)]


def _expected(frame, flat, dtype=np.uint16):
    """The documented arithmetic, written out: float32 x float32(1/flat), rint, clip."""
    inv = (1.0 / flat.astype(np.float64)).astype(np.float32)
    if frame.ndim == 3:
        inv = inv[..., None]
    info = np.iinfo(dtype)
    return np.clip(np.rint(frame.astype(np.float32) * inv), info.min, info.max).astype(dtype)


def _dusty(frames, flat):
    """Frames as the sensor saw them: scene x flat, rounded to the integer type."""
    f = flat if frames[0].ndim == 2 else flat[..., None]
    return [np.rint(fr.astype(np.float64) * f).astype(fr.dtype) for fr in frames]


# -- apply_flat -----------------------------------------------------------------

def test_apply_flat_round_trip_within_rounding():
    flat = _dust_flat()
    scene = _frames(1, seed=1)[0]
    raw = _dusty([scene], flat)[0]
    out, counts = apply_flat(raw, flat, np.uint16)
    assert out.dtype == np.uint16 and out.shape == scene.shape
    # raw = round(scene*flat): |raw/flat - scene| <= 0.5/flat <= 1 for flat >= 0.5,
    # plus 0.5 for the final rounding -> at most 1 ADU.
    assert np.abs(out.astype(np.int64) - scene).max() <= 1
    unity = flat == 1.0
    assert np.array_equal(out[unity], raw[unity])  # untouched outside the dust, bit for bit
    assert counts == (0, 0, 0)
    assert np.array_equal(out, _expected(raw, flat))


def test_apply_flat_stack_and_rgb():
    flat = _dust_flat(seed=2)
    stack = np.stack(_frames(3, seed=3))
    out, _ = apply_flat(stack, flat)
    assert np.array_equal(out, np.stack([_expected(f, flat) for f in stack]))
    rgb = np.random.default_rng(4).integers(0, 60000, (H, W, 3)).astype(np.uint16)
    out, _ = apply_flat(rgb, flat)
    assert out.shape == (H, W, 3)
    for c in range(3):  # every channel divided by the same flat
        assert np.array_equal(out[..., c], _expected(rgb[..., c], flat))


@pytest.mark.parametrize("dtype, near_top", [(np.uint16, 65000), (np.uint8, 250)])
def test_clipping_is_counted_never_wrapped(dtype, near_top):
    flat = np.ones((8, 8), np.float32)
    flat[:2] = 0.5  # x2 gain: 16 pixels overflow
    frame = np.full((8, 8), near_top, dtype=dtype)
    frame[:2, :4] = 10  # these stay small: 8 pixels, no clipping
    out, counts = apply_flat(frame, flat)
    top = np.iinfo(dtype).max
    assert counts.clipped_high == 8 and counts.clipped_low == 0
    assert np.all(out[:2, 4:] == top)  # clipped to the top, not wrapped to small values
    assert np.all(out[:2, :4] == 20)
    assert np.array_equal(out[2:], frame[2:])


def test_guarded_flat_values_are_counted_and_leave_pixels_alone():
    flat = np.ones((6, 7), np.float32)
    bad = [(0, 0, np.nan), (1, 1, np.inf), (2, 2, -np.inf), (3, 3, 0.0), (4, 4, -0.5)]
    for y, x, v in bad:
        flat[y, x] = v
    flat[5, 6] = 0.5
    frame = np.full((6, 7), 1000, np.uint16)
    out, counts = apply_flat(frame, flat)
    assert counts.guarded == len(bad)
    for y, x, _ in bad:
        assert out[y, x] == 1000
    assert out[5, 6] == 2000
    image, stats = calibrate_image(frame, flat)
    assert stats.n_nonfinite == len(bad) and stats.n_flat_changed == 1
    assert stats.flat_min == 0.5 and stats.flat_max == 1.0


def test_float_images_stay_float_and_are_not_rounded():
    rng = np.random.default_rng(6)
    flat = _dust_flat(seed=6)
    img = rng.uniform(-5, 5000, (H, W)).astype(np.float32)
    out, stats = calibrate_image(img, flat)
    assert out.dtype == np.float32
    inv = (1.0 / flat.astype(np.float64)).astype(np.float32)
    assert np.array_equal(out, img * inv)  # one float32 multiply, no rounding or clipping
    assert stats.n_clipped_high == stats.n_clipped_low == 0 and stats.n_frames == 1
    json.dumps(stats.to_dict())  # JSON-ready


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_to_integer_counts_negative_nan_and_overflow(dtype):
    img = np.array([[-3.0, np.nan, 1e9, 12.4, np.inf, 1e300 if dtype == np.float64 else 3e38]], dtype)
    flat = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 0.5]], np.float32)
    out, counts = apply_flat(img, flat, np.uint16)  # no warnings (they are errors here)
    assert out.tolist() == [[0, 0, 65535, 12, 65535, 65535]]
    assert counts.clipped_low == 2 and counts.clipped_high == 3


def test_apply_flat_shape_mismatch():
    with pytest.raises(InputError, match=r"\(4, 5\).*\(5, 4\)"):
        apply_flat(np.zeros((5, 4), np.uint16), np.ones((4, 5), np.float32))
    with pytest.raises(InputError, match="2-D"):
        apply_flat(np.zeros((5, 4), np.uint16), np.ones((5, 4, 3), np.float32))


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_sparse_and_dense_paths_agree(monkeypatch, fraction):
    # fraction 0 forces the dense path, 1 the sparse one; both must match _expected.
    monkeypatch.setattr(calibrate, "_SPARSE_MAX_FRACTION", fraction)
    monkeypatch.setattr(calibrate, "_DENSE_BLOCK", 7 * W + 3)  # blocks not dividing H
    flat = _dust_flat(seed=7, low=0.3)
    stack = np.stack(_frames(2, seed=8, lo=0, hi=65536))
    out, counts = apply_flat(stack, flat)
    want = np.stack([_expected(f, flat) for f in stack])
    assert np.array_equal(out, want)
    inv = (1.0 / flat.astype(np.float64)).astype(np.float32)
    assert counts.clipped_high == int(np.count_nonzero(np.rint(stack * inv) > 65535))
    assert counts.clipped_high > 0


# -- calibrate_ser ----------------------------------------------------------------

@pytest.fixture
def dusty_ser(tmp_path):
    flat = _dust_flat(seed=9)
    scene = _frames(7, seed=10)
    path = tmp_path / "in.ser"
    write_ser(path, _dusty(scene, flat), timestamps=[1000 + i for i in range(7)])
    return path, flat, scene


def test_calibrate_ser_round_trip(tmp_path, dusty_ser):
    path, flat, scene = dusty_ser
    before = _sha256(path)
    out = tmp_path / "out.ser"
    stats = calibrate_ser(path, flat, out)
    assert _sha256(path) == before  # the input is never modified
    assert isinstance(stats, CalibrationStats)
    assert stats.n_frames == 7 and stats.n_pixels == 7 * H * W
    assert stats.n_clipped_high == stats.n_clipped_low == stats.n_nonfinite == 0
    assert stats.dtype == "uint16" and stats.n_flat_changed == int(np.count_nonzero(flat != 1))
    with SerReader(path) as src, SerReader(out) as res:
        assert res.n_frames == 7 and res.dtype == np.uint16
        assert np.array_equal(res.timestamps, src.timestamps)
        assert res.header.color_id == src.header.color_id
        for i in range(7):
            got = res.frame(i)
            assert np.abs(got.astype(np.int64) - scene[i]).max() <= 1  # rounding, 1 ADU
            assert np.array_equal(got, _expected(src.frame(i), flat))
            assert np.array_equal(got[flat == 1], src.frame(i)[flat == 1])
    assert not list(tmp_path.glob(".*part"))


def test_calibrate_ser_many_chunks_and_header(tmp_path, monkeypatch):
    # Tiny chunks: 2 frames each over 9 frames, so the ping-pong buffers cycle.
    monkeypatch.setattr(calibrate, "_CHUNK_BYTES", 2 * H * W * 2)
    flat = _dust_flat(seed=11)
    frames = _frames(9, seed=12)
    path = tmp_path / "in.ser"
    like = SerHeader(color_id=0, little_endian_flag=0, width=W, height=H, pixel_depth=12,
                     frame_count=0, observer="me", telescope="scope")
    write_ser(path, frames, like=like)
    out = tmp_path / "out.ser"
    stats = calibrate_ser(path, flat, out)
    assert stats.n_frames == 9
    with SerReader(out) as res:
        assert res.header.pixel_depth == 12
        assert (res.header.observer, res.header.telescope) == ("me", "scope")
        for i in range(9):
            assert np.array_equal(res.frame(i), _expected(frames[i], flat))


@pytest.mark.parametrize("color_id", [100, 101])
def test_calibrate_rgb_ser(tmp_path, color_id):
    flat = _dust_flat(seed=13)
    frames = _frames(3, seed=14, shape=(H, W, 3))
    path = tmp_path / "rgb.ser"
    write_ser(path, frames, color_id=color_id)
    stats = calibrate_ser(path, flat, tmp_path / "out.ser")
    assert stats.n_pixels == 3 * H * W * 3
    with SerReader(tmp_path / "out.ser") as res:
        assert res.header.color_id == color_id
        for i in range(3):
            assert np.array_equal(res.frame(i), _expected(frames[i], flat))


def test_calibrate_ser_uint8_clipping(tmp_path):
    flat = np.full((H, W), 0.5, np.float32)
    frames = [np.full((H, W), 200, np.uint8), np.full((H, W), 100, np.uint8)]
    path = write_ser(tmp_path / "in8.ser", frames)
    stats = calibrate_ser(path, flat, tmp_path / "out8.ser")
    assert stats.n_clipped_high == H * W and stats.dtype == "uint8"
    with SerReader(tmp_path / "out8.ser") as res:
        assert np.all(res.frame(0) == 255) and np.all(res.frame(1) == 200)


def test_calibrate_ser_shape_mismatch_writes_nothing(tmp_path, dusty_ser):
    path, flat, _ = dusty_ser
    out = tmp_path / "out.ser"
    with pytest.raises(InputError) as info:
        calibrate_ser(path, flat[:, :-1], out)
    msg = str(info.value)
    assert f"{(H, W - 1)}" in msg and f"({H}, {W})" in msg
    assert not out.exists()


def test_calibrate_ser_refuses_to_overwrite_input(dusty_ser):
    path, flat, _ = dusty_ser
    before = _sha256(path)
    with pytest.raises(OutputError):
        calibrate_ser(path, flat, path)
    assert _sha256(path) == before


def test_output_appears_only_on_success(tmp_path, dusty_ser, monkeypatch):
    path, flat, _ = dusty_ser
    out = tmp_path / "out.ser"
    calls = {"n": 0}
    real_write = SerWriter.write

    def failing_write(self, frame):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        real_write(self, frame)

    monkeypatch.setattr(SerWriter, "write", failing_write)
    before = _sha256(path)
    with pytest.raises(OSError, match="simulated"):
        calibrate_ser(path, flat, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".*part"))  # no temporary left behind
    assert _sha256(path) == before


def test_calibrate_ser_guarded_flat(tmp_path, dusty_ser):
    path, flat, _ = dusty_ser
    flat = flat.copy()
    flat[0, :3] = [np.nan, 0.0, -1.0]
    stats = calibrate_ser(path, flat, tmp_path / "o.ser")
    assert stats.n_nonfinite == 3
    with SerReader(path) as src, SerReader(tmp_path / "o.ser") as res:
        assert np.array_equal(res.frame(0)[0, :3], src.frame(0)[0, :3])


def test_stats_to_dict_is_plain_json(dusty_ser, tmp_path):
    path, flat, _ = dusty_ser
    d = calibrate_ser(path, flat, tmp_path / "o.ser", progress=True).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) >= {"n_frames", "n_pixels", "n_clipped_high", "n_clipped_low",
                      "n_nonfinite", "dtype", "flat_min", "flat_max"}


def test_calibrate_big_endian_input(tmp_path):
    yy, xx = np.mgrid[0:H, 0:W]
    frames = [(20000 + 300 * yy + 200 * xx + i).astype(np.uint16) for i in range(3)]
    path = tmp_path / "be.ser"
    header = SerHeader(color_id=0, little_endian_flag=0, width=W, height=H, pixel_depth=16,
                       frame_count=3)
    with open(path, "wb") as fh:
        fh.write(header.pack())
        for f in frames:
            fh.write(f.astype(">u2").tobytes())
    flat = _dust_flat(seed=15)
    calibrate_ser(path, flat, tmp_path / "out.ser")
    with SerReader(path) as src, SerReader(tmp_path / "out.ser") as res:
        assert src.byteorder == "big" and res.byteorder == "little"
        for i in range(3):
            assert np.array_equal(res.frame(i), _expected(frames[i], flat))

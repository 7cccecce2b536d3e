"""Tests for aiflat_local.reference: exact temporal median with bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import aiflat_local.reference as reference
from aiflat_local.errors import InputError
from aiflat_local.io.ser import SerReader, write_ser
from aiflat_local.reference import (
    balance_cfa,
    read_reference,
    reference_to_mono,
    temporal_median,
)


def _frames(n, shape, dtype, seed, vmax=None):
    """Random frames with many ties (a narrow value range), the hard case for a median."""
    rng = np.random.default_rng(seed)
    top = vmax if vmax is not None else np.iinfo(dtype).max
    return [rng.integers(0, top, size=shape, endpoint=True).astype(dtype) for _ in range(n)]


def _numpy_median(frames):
    return np.median(np.stack(frames), axis=0).astype(np.float32)


@pytest.fixture
def make_ser(tmp_path):
    def make(frames, name="v.ser", **kw):
        return write_ser(tmp_path / name, frames, **kw)

    return make


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 31])
def test_bit_identical_to_numpy_median(make_ser, dtype, n):
    # Narrow range -> ties; full range -> the even-count mean needs its .5.
    for vmax in (5, None):
        frames = _frames(n, (23, 17), dtype, seed=n, vmax=vmax)
        path = make_ser(frames, name=f"v{vmax}.ser")
        with SerReader(path) as r:
            got = temporal_median(r)
        want = _numpy_median(frames)
        assert got.dtype == np.float32 and got.shape == (23, 17)
        assert np.array_equal(got, want)  # bit-identical, not approximately


@pytest.mark.parametrize(
    "start, stop, step",
    [(0, None, 1), (3, None, 1), (0, 20, 3), (5, 18, 2), (-9, None, 1), (2, -3, 4), (0, 100, 7)],
)
def test_ranges_and_steps(make_ser, start, stop, step):
    frames = _frames(25, (19, 21), np.uint16, seed=4)
    path = make_ser(frames)
    with SerReader(path) as r:
        got = temporal_median(r, start=start, stop=stop, step=step)
    assert np.array_equal(got, _numpy_median(frames[start:stop:step]))


@pytest.mark.parametrize("max_memory_mb", [0.0005, 0.002, 0.01, 0.05, 256])
@pytest.mark.parametrize("workers", [1, 2])
def test_tiny_memory_many_bands_and_columns(make_ser, max_memory_mb, workers):
    # 37 rows and 23 columns are primes: no band or column tile divides them.
    frames = _frames(12, (37, 23), np.uint16, seed=7)
    path = make_ser(frames)
    with SerReader(path) as r:
        got = temporal_median(r, max_memory_mb=max_memory_mb, workers=workers)
    assert np.array_equal(got, _numpy_median(frames))


def test_plan_bands_then_row_pieces():
    budget = 256 * 2**20
    # Plenty of memory: whole-row bands, all frames staged, cache-sized tiles.
    plan = reference._plan(1200, 1920, 200, 2, budget, 2)
    assert plan.whole_rows and plan.band_cols == 1920 and 1 <= plan.band_rows < 1200
    assert plan.chunk == 200
    assert plan.tile_px * 200 * 2 <= reference._TARGET_TILE_BYTES
    assert plan.worker_bytes(200, 2) <= budget // 2
    # Not even one row across all frames fits: pieces of a row, frames in chunks.
    n = 100_000
    plan = reference._plan(1200, 1920, n, 2, 64 * 2**20, 2)
    assert not plan.whole_rows and plan.band_rows == 1 and plan.band_cols < 1920 and plan.chunk < n
    assert plan.worker_bytes(n, 2) <= 32 * 2**20


@pytest.mark.parametrize("n", [1, 10, 1000, 10**6])
@pytest.mark.parametrize("budget_mb", [0.001, 1, 256])
def test_plan_respects_the_budget(n, budget_mb):
    budget = int(budget_mb * 2**20)
    plan = reference._plan(37, 23 * 3, n, 2, budget, 2)
    floor = n * 2 + 24 + 2  # one pixel across all frames, one staged sample
    assert plan.worker_bytes(n, 2) <= max(budget // 2, floor)


def test_row_piece_that_spans_the_whole_row(make_ser):
    # A budget where one row of all frames does not fit half a worker's share,
    # yet a "piece" of a row is the whole row, staged in frame chunks.
    frames = _frames(30, (7, 5), np.uint16, seed=13)
    budget = 1160
    plan = reference._plan(7, 5, 30, 2, budget, 2)
    assert not plan.whole_rows and plan.band_cols == 5 and plan.chunk < 30
    with SerReader(make_ser(frames)) as r:
        got = temporal_median(r, max_memory_mb=budget / 2**20)
    assert np.array_equal(got, _numpy_median(frames))


def test_band_height_not_dividing(make_ser, monkeypatch):
    # Force 5-row bands and 7-pixel tiles on a 37 x 11 frame.
    frames = _frames(6, (37, 11), np.uint16, seed=8)
    path = make_ser(frames)
    monkeypatch.setattr(reference, "_TARGET_BAND_BYTES", 5 * 11 * 6 * 2)
    monkeypatch.setattr(reference, "_TARGET_TILE_BYTES", 7 * (6 * 2 + 24))
    plan = reference._plan(37, 11, 6, 2, 2**30, 2)
    assert (plan.band_rows, plan.tile_px) == (5, 7)
    with SerReader(path) as r:
        got = temporal_median(r)
    assert np.array_equal(got, _numpy_median(frames))


def test_working_memory_does_not_grow_with_frames(make_ser):
    # Peak traced allocations stay under the budget plus the result, for 20 or
    # 200 frames alike (the whole 200-frame video is 1.6 MB, 8x the budget).
    budget_mb = 0.2
    peaks = []
    for n in (20, 200):
        frames = _frames(n, (64, 64), np.uint16, seed=n)
        path = make_ser(frames, name=f"m{n}.ser")
        with SerReader(path) as r:
            tracemalloc.start()
            got = temporal_median(r, max_memory_mb=budget_mb, workers=2)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert np.array_equal(got, _numpy_median(frames))
        peaks.append(peak)
    result_bytes = 64 * 64 * 4
    for peak in peaks:
        assert peak <= budget_mb * 2**20 + result_bytes + 64 * 2**10  # 64 KiB slack


@pytest.mark.parametrize("color_id", [100, 101])
def test_rgb_and_bgr_ser(make_ser, color_id):
    frames = _frames(6, (13, 9, 3), np.uint16, seed=color_id)
    path = make_ser(frames, color_id=color_id)
    with SerReader(path) as r:
        got = temporal_median(r, max_memory_mb=0.001)
        want = _numpy_median([r.frame(i) for i in range(r.n_frames)])
    assert got.shape == (13, 9, 3)
    assert np.array_equal(got, want)
    assert np.array_equal(got, _numpy_median(frames))  # RGB order both ways


def test_byteswapped_reading_path(make_ser):
    # byteorder="big" on little-endian data exercises SerReader.band's copying path.
    frames = _frames(5, (16, 10), np.uint16, seed=3)
    path = make_ser(frames)
    with SerReader(path, byteorder="big") as r:
        got = temporal_median(r, max_memory_mb=0.001)
        want = _numpy_median([r.frame(i) for i in range(r.n_frames)])
    assert np.array_equal(got, want)


def test_progress_bar_runs(make_ser, capsys):
    frames = _frames(3, (8, 8), np.uint8, seed=1)
    with SerReader(make_ser(frames)) as r:
        got = temporal_median(r, progress=True)
    assert np.array_equal(got, _numpy_median(frames))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(start=10), "select no frame"),
        (dict(start=4, stop=4), "select no frame"),
        (dict(stop=-20), "select no frame"),
        (dict(step=0), "step must be >= 1"),
        (dict(step=1.5), "step must be an integer"),
        (dict(max_memory_mb=0), "max_memory_mb must be > 0"),
        (dict(workers=0), "workers must be"),
    ],
)
def test_invalid_arguments(make_ser, kwargs, words):
    with SerReader(make_ser(_frames(10, (4, 4), np.uint8, seed=0))) as r:
        with pytest.raises(InputError, match=words) as info:
            temporal_median(r, **kwargs)
    assert "\n" not in str(info.value)


def test_empty_range_message_names_the_video(make_ser):
    path = make_ser(_frames(10, (4, 4), np.uint8, seed=0))
    with pytest.raises(InputError) as info:
        read_reference(path, start=12)
    msg = str(info.value)
    assert str(path) in msg and "10 frame(s)" in msg and "start=12" in msg


def test_read_reference_provenance(make_ser):
    frames = _frames(9, (6, 5), np.uint16, seed=2)
    path = make_ser(frames, timestamps=range(9))
    image, prov = read_reference(path, start=1, step=2)
    assert np.array_equal(image, _numpy_median(frames[1::2]))
    assert prov["frames_used"] == 4 and prov["n_frames_in_file"] == 9
    assert (prov["start"], prov["stop"], prov["step"]) == (1, 9, 2)
    assert prov["dtype"] == "uint16" and prov["color"] == "MONO"


def test_balance_cfa_flattens_the_mosaic_and_keeps_ratios():
    rng = np.random.default_rng(5)
    scene = rng.uniform(0.8, 1.2, (32, 40)).astype(np.float32)
    gains = np.array([[3000.0, 1000.0], [1200.0, 200.0]], dtype=np.float32)
    mosaic = scene * np.tile(gains, (16, 20))
    balanced = balance_cfa(mosaic, 8)
    assert balanced.dtype == np.float32
    for i in (0, 1):
        for j in (0, 1):
            assert abs(float(np.median(balanced[i::2, j::2])) - 1.0) < 1e-6
    # A per-site constant cancels in a ratio of two images of the same mosaic.
    dusty = mosaic.copy()
    dusty[10:14, 10:14] *= 0.7
    ratio_raw = dusty / mosaic
    ratio_bal = balance_cfa(dusty, 8) / balance_cfa(mosaic, 8)
    site_scale = ratio_bal / ratio_raw  # constant per site (dusty medians barely move)
    for i in (0, 1):
        for j in (0, 1):
            s = site_scale[i::2, j::2]
            assert np.ptp(s) < 1e-5
    # Mono and RGB: unchanged values.
    assert np.array_equal(balance_cfa(mosaic, 0), mosaic)
    rgb = rng.uniform(0, 1, (4, 4, 3)).astype(np.float32)
    assert np.array_equal(balance_cfa(rgb, 100), rgb)


def test_balance_cfa_leaves_dark_sites_alone():
    img = np.zeros((4, 4), np.float32)
    img[0::2, 0::2] = 10.0
    out = balance_cfa(img, 11)
    assert np.all(out[0::2, 0::2] == 1.0) and np.all(out[1::2, :] == 0.0)


def test_reference_to_mono():
    rgb = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    mono = reference_to_mono(rgb)
    assert mono.shape == (2, 3) and mono.dtype == np.float32
    assert np.allclose(mono, rgb.mean(axis=2), rtol=0, atol=1e-6)
    flat = np.ones((5, 6), np.float32)
    assert reference_to_mono(flat) is flat
    with pytest.raises(InputError, match="shape"):
        reference_to_mono(np.ones((2, 3, 4)))


def _write_big_endian_ser(path, frames):
    """A SER with big-endian 16-bit samples (as some capture programs write)."""
    from aiflat_local.io.ser import SerHeader

    h, w = frames[0].shape
    header = SerHeader(color_id=0, little_endian_flag=0, width=w, height=h, pixel_depth=16,
                       frame_count=len(frames))
    with open(path, "wb") as fh:
        fh.write(header.pack())
        for f in frames:
            fh.write(f.astype(">u2").tobytes())
    return path


def test_big_endian_file(tmp_path):
    # Smooth frames, so SerReader's byte-order detection can tell.
    yy, xx = np.mgrid[0:24, 0:30]
    rng = np.random.default_rng(9)
    frames = [(20000 + 300 * yy + 200 * xx + rng.integers(0, 40, yy.shape)).astype(np.uint16)
              for _ in range(6)]
    path = _write_big_endian_ser(tmp_path / "be.ser", frames)
    with SerReader(path) as r:
        assert r.byteorder == "big"
        got = temporal_median(r, max_memory_mb=0.001)
    assert np.array_equal(got, _numpy_median(frames))


def test_without_preadv(make_ser, monkeypatch):
    # Platforms without os.preadv (Windows) use seek + readinto under a lock.
    import os

    frames = _frames(5, (9, 7), np.uint16, seed=11)
    path = make_ser(frames)
    monkeypatch.delattr(os, "preadv", raising=False)
    with SerReader(path) as r:
        got = temporal_median(r, workers=2, max_memory_mb=0.001)
    assert np.array_equal(got, _numpy_median(frames))


def test_truncated_file_is_an_input_error(make_ser):
    frames = _frames(4, (8, 8), np.uint16, seed=12)
    path = make_ser(frames)
    with SerReader(path) as r:
        # The file shrinks after opening (e.g. a capture being rewritten).
        with open(path, "r+b") as fh:
            fh.truncate(178 + 2 * 8 * 8 * 2)
        with pytest.raises(InputError, match="unexpected end of file"):
            temporal_median(r)

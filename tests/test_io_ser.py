"""SER reading and writing: formats, quirks, recovery, and refusal of bad files."""

import struct

import numpy as np
import pytest

from aiflat_local.errors import InputError
from aiflat_local.io.ser import HEADER_SIZE, SerHeader, SerReader, SerWriter, parse_header, write_ser


def textured(rng, shape, dtype, top):
    """A smooth-ish field: byte-order detection relies on images being smoother than noise."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 0.5 + 0.3 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
    if len(shape) == 3:
        base = base[..., None] * np.array([1.0, 0.8, 0.6])
    return np.clip(base * top + rng.normal(0, top * 0.002, base.shape), 0, top).astype(dtype)


def raw_ser(path, frames, *, color_id=0, depth=16, flag=0, big=False, frame_count=None, trailer=None):
    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    header = SerHeader(color_id, flag, w, h, depth, len(frames) if frame_count is None else frame_count)
    data = frames.astype(frames.dtype.newbyteorder(">" if big else "<")).tobytes()
    with open(path, "wb") as fh:
        fh.write(header.pack())
        fh.write(data)
        if trailer is not None:
            fh.write(np.asarray(trailer, "<i8").tobytes())


@pytest.mark.parametrize("dtype,depth", [(np.uint8, 8), (np.uint16, 16), (np.uint16, 12)])
def test_mono_round_trip_with_trailer(tmp_path, dtype, depth):
    rng = np.random.default_rng(0)
    frames = [textured(rng, (24, 32), dtype, 200 if dtype == np.uint8 else 60000) for _ in range(5)]
    path = write_ser(tmp_path / "a.ser", frames, pixel_depth=depth, timestamps=[10, 20, 30, 40, 50])
    with SerReader(path) as r:
        assert (r.n_frames, r.height, r.width, r.dtype) == (5, 24, 32, np.dtype(dtype))
        assert r.header.pixel_depth == depth
        assert r.timestamps.tolist() == [10, 20, 30, 40, 50]
        assert r.warnings == []
        for i, f in enumerate(frames):
            assert np.array_equal(r.frame(i), f)
        band = r.band(slice(None), 3, 9)
        assert band.shape == (5, 6, 32) and np.array_equal(band[2], frames[2][3:9])


@pytest.mark.parametrize("flag,big", [(0, False), (1, False), (0, True), (1, True)])
def test_byte_order_detected_from_data_whatever_the_flag(tmp_path, flag, big):
    frames = [textured(np.random.default_rng(i), (32, 40), np.uint16, 50000) for i in range(2)]
    raw_ser(tmp_path / "b.ser", frames, flag=flag, big=big)
    with SerReader(tmp_path / "b.ser") as r:
        assert r.byteorder == ("big" if big else "little")
        assert np.array_equal(r.frame(1), frames[1])
    with SerReader(tmp_path / "b.ser", byteorder="flag") as r:  # the specification's reading
        assert r.byteorder == ("little" if flag == 1 else "big")


def test_rgb_and_bgr_are_returned_in_rgb_order(tmp_path):
    rgb = [textured(np.random.default_rng(i), (10, 12, 3), np.uint16, 40000) for i in range(3)]
    raw_ser(tmp_path / "rgb.ser", rgb, color_id=100)
    raw_ser(tmp_path / "bgr.ser", [f[..., ::-1] for f in rgb], color_id=101)
    for name in ("rgb.ser", "bgr.ser"):
        with SerReader(tmp_path / name) as r:
            assert r.frame_shape == (10, 12, 3)
            assert np.array_equal(r.frame(2), rgb[2])
            assert np.array_equal(r.band([0, 2], 1, 4)[1], rgb[2][1:4])
    # BGR written back keeps its ColorID and byte layout
    with SerReader(tmp_path / "bgr.ser") as r:
        write_ser(tmp_path / "bgr2.ser", r.iter_frames(), like=r.header)
    assert (tmp_path / "bgr2.ser").read_bytes()[HEADER_SIZE:] == (tmp_path / "bgr.ser").read_bytes()[HEADER_SIZE:]


def test_bayer_is_the_raw_mosaic(tmp_path):
    frames = [textured(np.random.default_rng(i), (16, 16), np.uint16, 30000) for i in range(2)]
    raw_ser(tmp_path / "bayer.ser", frames, color_id=8)
    with SerReader(tmp_path / "bayer.ser") as r:
        assert r.is_mosaic and r.header.color_name == "BAYER_RGGB"
        assert np.array_equal(r.frame(0), frames[0])


def test_frame_count_zero_recovers_whole_frames(tmp_path):
    frames = [textured(np.random.default_rng(i), (8, 10), np.uint16, 1000) for i in range(4)]
    raw_ser(tmp_path / "z.ser", frames, frame_count=0)
    with SerReader(tmp_path / "z.ser") as r:
        assert r.n_frames == 4 and "FrameCount is 0" in r.warnings[0]


def test_frame_count_zero_with_trailer_is_not_read_as_frames(tmp_path):
    frames = [textured(np.random.default_rng(i), (2, 2), np.uint16, 1000) for i in range(4)]  # 8-byte frames
    raw_ser(tmp_path / "zt.ser", frames, frame_count=0, trailer=[1, 2, 3, 4])
    with SerReader(tmp_path / "zt.ser") as r:
        assert r.n_frames == 4


def test_short_last_frame_recovers_what_is_whole(tmp_path):
    frames = [textured(np.random.default_rng(i), (8, 10), np.uint16, 1000) for i in range(5)]
    raw_ser(tmp_path / "s.ser", frames)
    data = (tmp_path / "s.ser").read_bytes()
    (tmp_path / "s.ser").write_bytes(data[:-37])
    with SerReader(tmp_path / "s.ser") as r:
        assert r.n_frames == 4 and "truncated" in r.warnings[0]
        assert np.array_equal(r.frame(3), frames[3])


@pytest.mark.parametrize("content,message", [
    (b"", "not a SER file"),
    (b"LUCAM-RECORDER" + b"\0" * 20, "truncated SER header"),
    (b"GIF89a" + b"\0" * 200, "not a SER file"),
])
def test_bad_headers_are_one_clear_error(tmp_path, content, message):
    (tmp_path / "bad.ser").write_bytes(content)
    with pytest.raises(InputError, match=message):
        SerReader(tmp_path / "bad.ser")


def test_unknown_color_id_and_zero_frames(tmp_path):
    h = SerHeader(7, 0, 4, 4, 16, 1)
    (tmp_path / "c.ser").write_bytes(h.pack() + b"\0" * 32)
    with pytest.raises(InputError, match="unknown SER ColorID 7"):
        SerReader(tmp_path / "c.ser")
    (tmp_path / "e.ser").write_bytes(SerHeader(0, 0, 4, 4, 16, 3).pack())
    with pytest.raises(InputError, match="no whole frame"):
        SerReader(tmp_path / "e.ser")
    with pytest.raises(InputError, match="no such file"):
        SerReader(tmp_path / "missing.ser")


def test_header_layout_is_178_bytes_little_endian():
    h = SerHeader(0, 0, 640, 480, 16, 7, observer="me", telescope="scope")
    raw = h.pack()
    assert len(raw) == HEADER_SIZE and raw[:14] == b"LUCAM-RECORDER"
    assert struct.unpack_from("<7i", raw, 14) == (0, 0, 0, 640, 480, 16, 7)
    assert parse_header(raw) == h


def test_writer_is_atomic_and_refuses_wrong_frames(tmp_path):
    out = tmp_path / "w.ser"
    with pytest.raises(ValueError):
        with SerWriter(out, width=4, height=3, dtype=np.uint16) as w:
            w.write(np.zeros((3, 4), np.uint16))
            w.write(np.zeros((3, 4), np.float32))  # wrong dtype: no silent conversion
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_reader_does_not_modify_input(tmp_path):
    frames = [textured(np.random.default_rng(i), (8, 10), np.uint16, 1000) for i in range(3)]
    path = write_ser(tmp_path / "in.ser", frames)
    before = path.read_bytes()
    with SerReader(path) as r:
        list(r.iter_frames())
    assert path.read_bytes() == before

"""The pipeline on colour videos, and the human check (overlay, report)."""

import json

import numpy as np
import pytest

from aiflat_local.io import read_image, read_mask
from aiflat_local.io.ser import SerReader, write_ser
from aiflat_local.pipeline import RunOptions, run
from aiflat_local.report import RED, YELLOW, outline, overlay


def dusty_frames(n, h, w, seed, planes=None, cfa=False):
    """Smooth field, drifting texture, and two fixed dark dust blobs (depths 40 % and 25 %)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    dust = 1 - 0.4 * np.exp(-((yy - 20) ** 2 + (xx - 25) ** 2) / 18) - 0.25 * np.exp(-((yy - 50) ** 2 + (xx - 70) ** 2) / 30)
    frames = []
    for i in range(n):
        sun = 20000 + 2000 * np.sin((xx + 2 * i) / 13) * np.cos((yy - i) / 17)
        img = sun * dust + rng.normal(0, 30, (h, w))
        if cfa:  # RGGB colour balance on the mosaic
            img = img * np.array([[1.0, 0.6], [0.6, 0.3]])[yy % 2, xx % 2]
        if planes:
            img = img[..., None] * np.array([1.0, 0.7, 0.4])
        frames.append(np.clip(img, 0, 65535).astype(np.uint16))
    return frames, dust


@pytest.mark.parametrize("kind", ["rgb", "bayer"])
def test_colour_videos_get_one_per_pixel_flat(tmp_path, kind):
    frames, dust = dusty_frames(7, 72, 96, seed=1, planes=kind == "rgb", cfa=kind == "bayer")
    write_ser(tmp_path / "v.ser", frames, color_id=100 if kind == "rgb" else 8)
    # The smooth sinusoidal "Sun" has no fine texture to register on, so the motion route falls back to
    # appearance; the Gaussian blobs are not shaped like the simulator's shadows dustnet learned, so the
    # classical masker is named here (this test is about colour handling).
    report = run(tmp_path / "v.ser", tmp_path / "out", RunOptions(progress=False, masker="classical"))
    flat, _ = read_image(tmp_path / "out" / "flat.fits")
    assert flat.shape == (72, 96)
    mask = read_mask(tmp_path / "out" / "mask.png")
    assert mask[20, 25] and mask[50, 70]  # both dust blobs found
    # the deep blob's centre is corrected to within a few percent of the true attenuation
    assert flat[20, 25] == pytest.approx(dust[20, 25], abs=0.04)
    with SerReader(tmp_path / "out" / "calibrated.ser") as cal:
        assert cal.header.color_id == (100 if kind == "rgb" else 8)
        out = cal.frame(3).astype(float)
    raw = frames[3].astype(float)
    ratio = out[20, 25] / raw[20, 25]
    assert np.all(np.abs(ratio - 1 / flat[20, 25]) < 0.01)
    if kind == "bayer":
        assert report["reference"]["cfa_balanced"] is True


def test_report_json_and_html_carry_provenance(tmp_path):
    frames, _ = dusty_frames(5, 64, 80, seed=2)
    write_ser(tmp_path / "v.ser", frames)
    report = run(tmp_path / "v.ser", tmp_path / "out", RunOptions(progress=False, frame_step=2))
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["reference"]["n_frames_used"] == 3
    assert saved["parameters"]["flat"]["expand_px"] == 10.0
    assert saved["versions"]["aiflat_local"] and saved["versions"]["numpy"]
    # auto masker for a video: motion (falls back to classical when the frames do not move enough)
    assert saved["mask"]["backend"] == "motion" and saved["inpaint"]["backend"] == "harmonic"
    assert saved["motion"]["used"] in (True, False) and saved["motion"]["reason"]
    assert set(saved["outputs"]) >= {"flat.fits", "calibrated.ser", "report.json"}
    html = (tmp_path / "out" / "report.html").read_text()
    assert "motion" in html and "overlay.png" in html
    _, info = read_image(tmp_path / "out" / "flat.fits")
    assert info.header["MASKER"] == "motion" and info.header["ROWORDER"] == "BOTTOM-UP"


def test_overlay_marks_mask_outline_and_soft_edge():
    ref = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    mask = np.zeros((40, 40), bool)
    mask[15:25, 15:25] = True
    soft = np.zeros((40, 40), np.float32)
    soft[10:30, 10:30] = 0.5
    rgb = overlay(ref, mask, soft)
    assert rgb.shape == (40, 40, 3) and rgb.dtype == np.uint8
    assert np.all(rgb[outline(mask)] == RED)
    assert np.all(rgb[10, 10:30] == YELLOW)
    inside = rgb[18:22, 18:22]
    assert np.all(inside[..., 0] == inside[..., 1])  # grey inside the outline: the data stays visible


def test_video_with_motion_gets_motion_flat_and_aligned_reference(tmp_path, small_video):
    report = run(small_video.video, tmp_path / "out", RunOptions(progress=False))
    assert report["motion"]["used"] is True, report["motion"]["reason"]
    assert "motion" in report["flat"]["gain_source"]
    aligned, _ = read_image(tmp_path / "out" / "reference_aligned.fits")
    assert aligned.shape == (96, 128)


def test_still_video_falls_back_and_says_why(tmp_path):
    from aiflat_local.synth import SimConfig, simulate

    sim = simulate(tmp_path / "sim", SimConfig(height=96, width=128, n_frames=6, seed=2, drift_px=0, jitter_px=0))
    report = run(sim.video, tmp_path / "out", RunOptions(progress=False))
    assert report["motion"]["used"] is False and report["motion"]["reason"]
    assert any("motion flat not used" in w for w in report["warnings"])
    assert report["flat"]["gain_source"] == "reference/inpainted"
    assert not (tmp_path / "out" / "reference_aligned.fits").exists()
    from aiflat_local.errors import InputError

    with pytest.raises(InputError, match="--flat-method motion"):
        run(sim.video, tmp_path / "out2", RunOptions(progress=False, flat_method="motion"))

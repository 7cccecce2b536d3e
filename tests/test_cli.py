"""The command-line contract: outputs of `run`, every subcommand, and one-line errors for bad input."""

import json

import numpy as np
import pytest

from aiflat_local.io import read_image, read_mask, write_fits, write_mask
from aiflat_local.io.ser import SerHeader, SerReader, write_ser
from conftest import snapshot

RUN_OUTPUTS = {"reference.fits", "mask.png", "mask_soft.fits", "inpainted.fits", "flat.fits", "flat.tif",
               "flat.xisf", "calibrated.ser", "report.json", "report.html", "overlay.png"}


def assert_one_line_error(code, err, pattern):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("aiflat-local: error:")
    assert pattern in lines[0], lines[0]


def test_run_on_video_writes_every_output(tmp_path, small_video, cli):
    before = snapshot(small_video.directory)
    code, out, err = cli("run", small_video.video, "-o", tmp_path / "out", "--quiet")
    assert code == 0, err
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert RUN_OUTPUTS <= names
    assert not [n for n in names if n.startswith(".")], names  # no staging leftovers
    assert snapshot(small_video.directory) == before  # inputs untouched

    ref, _ = read_image(tmp_path / "out" / "reference.fits")
    flat, _ = read_image(tmp_path / "out" / "flat.fits")
    soft, _ = read_image(tmp_path / "out" / "mask_soft.fits")
    mask = read_mask(tmp_path / "out" / "mask.png")
    assert ref.shape == flat.shape == soft.shape == mask.shape == (96, 128)
    assert np.all(flat[soft == 0] == 1.0)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("versions", "parameters", "input", "reference", "mask", "inpaint", "flat", "calibration", "timings_s"):
        assert key in report, key
    assert report["reference"]["n_frames_used"] == 9
    with SerReader(tmp_path / "out" / "calibrated.ser") as cal, SerReader(small_video.video) as raw:
        assert cal.n_frames == raw.n_frames and cal.dtype == raw.dtype
        # Away from the dust, calibration changes nothing, bit for bit.
        assert np.array_equal(cal.frame(4)[soft == 0], raw.frame(4)[soft == 0])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "overlay.png" in html


def test_run_on_image_writes_calibrated_fits(tmp_path, cli, small_video):
    with SerReader(small_video.video) as r:
        frame = r.frame(0)
    write_fits(tmp_path / "img.fits", frame)
    code, _, err = cli("run", tmp_path / "img.fits", "-o", tmp_path / "out", "--quiet")
    assert code == 0, err
    cal, info = read_image(tmp_path / "out" / "calibrated.fits")
    assert info.dtype == "uint16" and cal.shape == frame.shape


def test_mask_of_a_video_uses_its_frames_like_run(tmp_path, small_video, cli):
    """`mask VIDEO.ser` picks the motion masker and gives the mask `run` gives."""
    from aiflat_local.io import read_mask

    code, _, err = cli("mask", small_video.video, "-o", tmp_path / "mask.png")
    assert code == 0 and "(motion)" in err, err
    code, _, err = cli("run", small_video.video, "-o", tmp_path / "out", "--quiet", "--no-calibrate")
    assert code == 0, err
    assert np.array_equal(read_mask(tmp_path / "mask.png"), read_mask(tmp_path / "out" / "mask.png"))


def test_reference_mask_compare_calibrate_commands(tmp_path, small_video, cli):
    code, _, err = cli("reference", small_video.video, "-o", tmp_path / "ref.fits", "--quiet")
    assert code == 0, err
    code, _, err = cli("mask", tmp_path / "ref.fits", "-o", tmp_path / "mask.png")
    assert code == 0, err
    code, out, err = cli("compare", tmp_path / "mask.png", small_video.dust_mask, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert {"pixel_iou", "dice", "object_recall", "object_precision", "object_f1"} <= set(metrics)
    code, out, _ = cli("compare", tmp_path / "mask.png", tmp_path / "mask.png")
    assert code == 0 and "iou" in out.lower()

    flat = np.ones((96, 128), np.float32)
    flat[10:20, 10:20] = 0.5
    write_fits(tmp_path / "flat.fits", flat)
    code, _, err = cli("calibrate", small_video.video, "--flat", tmp_path / "flat.fits", "-o", tmp_path / "c.ser", "--quiet")
    assert code == 0, err
    with SerReader(tmp_path / "c.ser") as cal, SerReader(small_video.video) as raw:
        a, b = cal.frame(0).astype(float), raw.frame(0).astype(float)
    assert np.array_equal(a[30:, 30:], b[30:, 30:])
    assert np.allclose(a[12:18, 12:18], np.minimum(2 * b[12:18, 12:18], 65535), atol=1)


def make_bad_sers(d):
    d.mkdir(exist_ok=True)
    (d / "notser.ser").write_bytes(b"hello world, not a video" * 10)
    (d / "trunc.ser").write_bytes(b"LUCAM-RECORDER" + b"\0" * 40)
    (d / "zero.ser").write_bytes(SerHeader(0, 0, 8, 8, 16, 0).pack())
    (d / "color.ser").write_bytes(SerHeader(42, 0, 8, 8, 16, 1).pack() + b"\0" * 128)
    return d


@pytest.mark.parametrize("name,pattern", [
    ("notser.ser", "not a"), ("trunc.ser", "truncated SER header"),
    ("zero.ser", "no whole frame"), ("color.ser", "unknown SER ColorID 42"), ("missing.ser", "no such file"),
])
def test_bad_videos_are_one_line_errors_and_write_nothing(tmp_path, cli, name, pattern):
    bad = make_bad_sers(tmp_path / "in")
    before = snapshot(bad)
    code, _, err = cli("run", bad / name, "-o", tmp_path / "out", "--quiet")
    assert_one_line_error(code, err, pattern)
    assert snapshot(bad) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_mask_shape_mismatch_and_all_or_no_dust(tmp_path, cli, small_video):
    write_mask(tmp_path / "small.png", np.zeros((10, 10), bool))
    code, _, err = cli("run", small_video.video, "-o", tmp_path / "o1", "--mask", tmp_path / "small.png", "--quiet")
    assert_one_line_error(code, err, "mask is 10 x 10 but the image is 128 x 96")
    write_mask(tmp_path / "all.png", np.ones((96, 128), bool))
    code, _, err = cli("run", small_video.video, "-o", tmp_path / "o2", "--mask", tmp_path / "all.png", "--quiet")
    assert_one_line_error(code, err, "covers the whole image")
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    write_mask(tmp_path / "none.png", np.zeros((96, 128), bool))
    code, _, err = cli("run", small_video.video, "-o", tmp_path / "o3", "--mask", tmp_path / "none.png", "--quiet")
    assert code == 0 and "no dust found" in err
    flat, _ = read_image(tmp_path / "o3" / "flat.fits")
    assert np.all(flat == 1.0)
    code, _, err = cli("compare", tmp_path / "small.png", tmp_path / "all.png")
    assert_one_line_error(code, err, "mask shapes differ")


def test_nan_fits_output_file_and_readonly_location(tmp_path, cli, small_video, readonly_location):
    img = np.ones((32, 32), np.float32)
    img[3, 3] = np.nan
    write_fits(tmp_path / "nan.fits", img)
    code, _, err = cli("run", tmp_path / "nan.fits", "-o", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, "NaN/Inf")
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("run", small_video.video, "-o", tmp_path / "afile", "--quiet")
    assert_one_line_error(code, err, "not a directory")
    assert (tmp_path / "afile").read_text() == "x"
    code, _, err = cli("run", small_video.video, "-o", readonly_location, "--quiet")
    assert code == 2 and "aiflat-local: error:" in err and "Traceback" not in err


def test_unknown_backend_and_missing_weights_are_one_line(tmp_path, cli, small_video):
    code, _, err = cli("run", small_video.video, "-o", tmp_path / "o", "--masker", "nope", "--quiet")
    assert_one_line_error(code, err, "unknown masker 'nope'")


def test_input_is_never_overwritten(tmp_path, cli, small_video):
    import shutil

    video = tmp_path / "calibrated.ser"
    shutil.copyfile(small_video.video, video)
    before = video.read_bytes()
    code, _, err = cli("run", video, "-o", tmp_path, "--quiet")
    assert_one_line_error(code, err, "refusing to overwrite the input")
    assert video.read_bytes() == before


def test_demo_runs_and_scores(tmp_path, cli, monkeypatch):
    import aiflat_local.demo as demo
    from aiflat_local.synth import SimConfig

    small = SimConfig(height=96, width=128, n_frames=7, seed=5, n_dust=6)
    monkeypatch.setattr(demo, "demo_config", lambda seed: small)
    code, out, err = cli("demo", "-o", tmp_path / "demo", "--quiet")
    assert code == 0, err
    score = json.loads((tmp_path / "demo" / "demo_score.json").read_text())
    assert score["flat_exactly_one_outside_soft_mask"] is True
    assert "deep_dust_recall" in out


def test_weights_list_and_version(cli):
    code, out, _ = cli("weights", "list")
    assert code == 0 and "sam-vit-base" in out
    code, out, _ = cli("--version")
    assert code == 0 and "aiflat-local" in out


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_run_with_diffusion_inpainter_from_a_local_folder(tmp_path, cli, small_video):
    """End to end through the CLI: a tiny random diffusers folder, ensemble of 2, spread written, flat fenced."""
    pytest.importorskip("diffusers")
    from aiflat_local.inpaint._diffusion_tiny import make_tiny_inpaint_pipeline

    model = make_tiny_inpaint_pipeline(tmp_path / "tiny-sd")
    code, _, err = cli("run", small_video.video, "-o", tmp_path / "out", "--quiet", "--flat-method", "inpaint",
                       "--inpainter", "diffusion",
                       "--inpaint-model", model, "--ensemble", "2", "--seed", "7",
                       "--inpainter-option", "steps=2", "--inpainter-option", "crop_size=64",
                       "--inpainter-option", "context_px=8")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["inpaint"]["backend"] == "diffusion"
    assert report["inpaint"]["params"]["seed"] == 7
    spread, _ = read_image(tmp_path / "out" / "inpaint_spread.fits")
    soft, _ = read_image(tmp_path / "out" / "mask_soft.fits")
    flat, _ = read_image(tmp_path / "out" / "flat.fits")
    assert spread.shape == flat.shape and np.all(spread[soft == 0] == 0)
    assert np.all(flat[soft == 0] == 1.0)
    # a missing model is one clear line
    code, _, err = cli("run", small_video.video, "-o", tmp_path / "o2", "--quiet", "--inpainter", "diffusion",
                       "--inpaint-model", tmp_path / "nope")
    assert_one_line_error(code, err, "nope")

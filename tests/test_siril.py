"""Siril calibrates a SER with our flat.fits the way we do (skips when siril-cli is absent).

DESIGN.md: Siril turns SER frames bottom-up on load; our flat.fits is stored bottom-up with
ROWORDER = 'BOTTOM-UP', so the dust lands on the dust. An upside-down flat would put the
correction at the mirrored rows, which this test would catch.
"""

import shutil
import subprocess

import numpy as np
import pytest

from aiflat_local.calibrate import calibrate_ser
from aiflat_local.io import write_fits
from aiflat_local.io.ser import SerReader, write_ser

SIRIL = shutil.which("siril-cli")
pytestmark = pytest.mark.skipif(SIRIL is None, reason="siril-cli not installed (apt-get install siril)")


def siril_version() -> tuple[int, ...]:
    out = subprocess.run([SIRIL, "--version"], capture_output=True, text=True, timeout=60).stdout
    digits = next((w for w in out.split() if w[:1].isdigit()), "1.0")
    return tuple(int(p) for p in digits.split(".")[:2] if p.isdigit())


def test_siril_matches_our_calibration(tmp_path):
    rng = np.random.default_rng(7)
    h, w = 48, 64
    yy, xx = np.mgrid[:h, :w]
    frames = [(20000 + 3000 * np.sin(xx / 9 + i) + rng.normal(0, 20, (h, w))).astype(np.uint16) for i in range(4)]
    write_ser(tmp_path / "video.ser", frames)
    flat = np.ones((h, w), np.float32)
    flat[4:12, 6:20] = 0.6  # dust near the TOP of the sensor: orientation errors cannot hide
    flat[30:34, 40:44] = 1.02  # a bright rim: gain above 1
    write_fits(tmp_path / "flat.fits", flat)
    calibrate_ser(tmp_path / "video.ser", flat, tmp_path / "ours.ser")

    command = "calibrate" if siril_version() >= (1, 2) else "preprocess"
    (tmp_path / "run.ssf").write_text(f"requires 0.99.4\n{command} video -flat=flat.fits -prefix=P_\n")
    proc = subprocess.run([SIRIL, "-d", str(tmp_path), "-s", str(tmp_path / "run.ssf")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with SerReader(tmp_path / "P_video.ser") as siril, SerReader(tmp_path / "ours.ser") as ours:
        assert siril.n_frames == ours.n_frames == 4
        for i in range(4):
            a, b = siril.frame(i).astype(np.float64), ours.frame(i).astype(np.float64)
            scale = np.median(a / b)  # Siril may normalise the flat by a global factor
            assert abs(scale - 1) < 0.02
            np.testing.assert_allclose(a, b * scale, atol=2 + 2e-4 * b.max())
            # the correction is where the dust is, not at the mirrored rows
            assert np.median(a[4:12, 6:20] / frames[i][4:12, 6:20]) > 1.6
            assert abs(np.median(a[h - 12:h - 4, 6:20] / frames[i][h - 12:h - 4, 6:20]) / scale - 1) < 0.01

"""Deterministic inpainters: exactness, locality, per-region cost, borders, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from aiflat_local.errors import InputError
from aiflat_local.inpaint import INPAINTERS
from aiflat_local.inpaint.harmonic import BiharmonicInpainter, HarmonicInpainter

NAMES = ["harmonic", "biharmonic"]


def _grid(h=64, w=80):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return y, x


def _interior_holes(h=64, w=80):
    m = np.zeros((h, w), bool)
    m[20:40, 30:45] = True           # a block
    m[5:9, 5:12] = True              # a small one
    m[50:52, 60:70] = True           # a thin one
    yy, xx = np.mgrid[0:h, 0:w]
    m |= (yy - 30) ** 2 + (xx - 62) ** 2 <= 36   # a disk
    return m


@pytest.mark.parametrize("name", NAMES)
def test_registry_builds_each_inpainter(name):
    inp = INPAINTERS.create(name)
    assert inp.name == name
    res = inp(np.ones((8, 8), np.float32), np.zeros((8, 8), bool))
    assert res.params["backend"] == name
    assert res.image.dtype == np.float32


@pytest.mark.parametrize("name", NAMES)
def test_unchanged_outside_mask_bit_exact(name):
    rng = np.random.default_rng(3)
    img = rng.normal(100, 10, (64, 80)).astype(np.float32)
    m = _interior_holes()
    m[0:5, 75:80] = True  # and one in a corner
    res = INPAINTERS.create(name)(img, m)
    assert res.image.dtype == np.float32
    assert np.array_equal(res.image[~m], img[~m])
    assert np.isfinite(res.image).all()
    # A harmonic/biharmonic fill stays within a sane range of the data.
    assert img.min() - 50 < res.image[m].min() and res.image[m].max() < img.max() + 50


@pytest.mark.parametrize("name", NAMES)
def test_linear_ramp_exact_inside_holes(name):
    y, x = _grid()
    ramp = (300 + 0.5 * x - 0.25 * y).astype(np.float32)
    m = _interior_holes()
    res = INPAINTERS.create(name)(ramp, m)
    # float32 rounding of values ~300: tolerance 1e-3 absolute (~3 ulp).
    assert np.abs(res.image - ramp).max() < 1e-3


def test_biharmonic_reproduces_a_quadratic():
    y, x = _grid()
    quad = 50 + 0.01 * x * x + 0.02 * x * y - 0.015 * y * y + 0.3 * x
    m = _interior_holes()
    res = BiharmonicInpainter()(quad, m)
    # Exact up to the float32 output rounding (values ~50-150).
    assert np.abs(res.image - quad).max() < 1e-4
    # The harmonic fill cannot (the quadratic's Laplacian is not zero).
    assert np.abs(HarmonicInpainter()(quad, m).image - quad).max() > 0.1


def test_harmonic_obeys_the_maximum_principle():
    rng = np.random.default_rng(5)
    img = rng.random((40, 40)).astype(np.float32)
    m = np.zeros((40, 40), bool)
    m[10:30, 12:25] = True
    ring = np.zeros_like(m)
    ring[9:31, 11:26] = True
    ring &= ~m
    out = HarmonicInpainter()(img, m).image
    assert out[m].min() >= img[ring].min() - 1e-6
    assert out[m].max() <= img[ring].max() + 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_regions_touching_the_border(name):
    y, x = _grid()
    ramp = (10 + 0.5 * x + 0.25 * y).astype(np.float32)
    m = np.zeros(ramp.shape, bool)
    m[0:6, 70:80] = True      # corner
    m[30:40, 0:3] = True      # left edge
    m[60:64, 20:30] = True    # bottom edge
    res = INPAINTERS.create(name)(ramp, m)
    assert np.isfinite(res.image).all()
    err = np.abs(res.image - ramp)[m].max()
    if name == "biharmonic":
        # One-sided second differences at the border: ramps stay exact.
        assert err < 1e-3
    else:
        # Zero-flux border: flattens towards the edge, but stays within the
        # range of the ramp over the region's neighbourhood (slope <= 0.5/px).
        assert err < 0.5 * 10


def test_cost_scales_with_the_mask_not_the_image():
    img = np.zeros((3000, 3000), np.float32)
    img[:] = np.arange(3000, dtype=np.float32)[None, :] * 0.01
    m = np.zeros(img.shape, bool)
    m[1500:1504, 200:205] = True
    for cls in (HarmonicInpainter, BiharmonicInpainter):
        t0 = time.perf_counter()
        res = cls()(img, m)
        dt = time.perf_counter() - t0
        assert res.params["n_regions"] == 1
        assert np.abs(res.image[m] - img[m]).max() < 1e-3
        # A whole-image sparse solve (9e6 unknowns) would take minutes.
        assert dt < 1.5, f"{cls.__name__} took {dt:.2f} s for one tiny hole"


def test_many_regions_each_solved_and_counted():
    y, x = _grid(128, 128)
    ramp = (1 + 0.1 * x + 0.2 * y).astype(np.float32)
    m = np.zeros(ramp.shape, bool)
    for i in range(6):
        for j in range(6):
            m[10 + 20 * i: 14 + 20 * i, 8 + 20 * j: 11 + 20 * j] = True
    for cls in (HarmonicInpainter, BiharmonicInpainter):
        res = cls()(ramp, m)
        assert res.params["n_regions"] == 36
        assert res.params["n_pixels"] == 36 * 12
        assert np.abs(res.image - ramp).max() < 1e-4


def test_large_region_fallbacks_are_accurate_and_reported():
    y, x = _grid(160, 160)
    ramp = (5 + 0.3 * x + 0.1 * y).astype(np.float32)
    m = np.zeros(ramp.shape, bool)
    m[20:140, 20:140] = True  # 14400 unknowns
    # Harmonic coarse-to-fine + conjugate gradients instead of a direct solve.
    res = HarmonicInpainter(max_direct=1000)(ramp, m)
    assert np.abs(res.image - ramp).max() < 1e-3
    # Biharmonic above its size limit falls back to harmonic, and says so.
    res = BiharmonicInpainter(max_biharmonic=1000)(ramp, m)
    assert res.params["n_regions_fallback"] == 1
    assert np.abs(res.image - ramp).max() < 1e-3


def test_empty_mask_returns_a_copy():
    img = np.arange(20, dtype=np.float32).reshape(4, 5)
    for cls in (HarmonicInpainter, BiharmonicInpainter):
        res = cls()(img, np.zeros(img.shape, bool))
        assert np.array_equal(res.image, img) and res.image is not img
        assert res.params["n_regions"] == 0


def test_non_finite_pixels_outside_the_mask_are_ignored_and_kept():
    y, x = _grid(40, 40)
    ramp = (2 + 0.5 * x).astype(np.float32)
    ramp[15, 10] = np.nan   # next to the hole
    m = np.zeros(ramp.shape, bool)
    m[12:20, 11:20] = True
    # The missing pixel acts like an image border: zero flux for the harmonic
    # fill (a small local error), one-sided differences for the biharmonic one.
    for cls, tol in ((HarmonicInpainter, 0.5), (BiharmonicInpainter, 1e-3)):
        out = cls()(ramp, m).image
        assert np.isnan(out[15, 10])
        assert np.isfinite(out[m]).all()
        assert np.abs(out[m] - (2 + 0.5 * x[m])).max() < tol


@pytest.mark.parametrize("name", NAMES)
def test_errors(name):
    inp = INPAINTERS.create(name)
    with pytest.raises(InputError, match="whole image"):
        inp(np.ones((6, 6), np.float32), np.ones((6, 6), bool))
    with pytest.raises(InputError, match="differs"):
        inp(np.ones((6, 6), np.float32), np.zeros((6, 7), bool))
    with pytest.raises(InputError, match="2-D"):
        inp(np.ones((2, 6, 6), np.float32), np.zeros((2, 6, 6), bool))


def test_biharmonic_never_overshoots_far_beyond_its_surroundings():
    """A large region against the image border: continued gradients could blow up; the fill stays sane."""
    from aiflat_local.inpaint.harmonic import BiharmonicInpainter

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:60, :60]
    img = (1000 + 50 * np.sin(xx / 3.0) + 40 * np.cos(yy / 2.0) + rng.normal(0, 10, (60, 60))).astype(np.float32)
    mask = np.zeros((60, 60), bool)
    mask[:45, :50] = True  # most of the image, touching two borders
    result = BiharmonicInpainter()(img, mask)
    known = img[~mask]
    span = known.max() - known.min()
    filled = result.image[mask]
    assert filled.min() >= known.min() - span and filled.max() <= known.max() + span
    assert np.array_equal(result.image[~mask], img[~mask])

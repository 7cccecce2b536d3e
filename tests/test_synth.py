"""Tests of the dusty-solar-video simulator (aiflat_local.synth).

Small sizes (about 128 x 160) and few frames keep every test well under a second
or two. Tolerances are stated where they are not exact identities.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scipy import ndimage

from aiflat_local.synth import (
    TEXTURES,
    SimConfig,
    clean_sun,
    expected_frame,
    iter_frames,
    make_scene,
    render_frame,
    simulate,
)

SMALL = dict(height=128, width=160, n_frames=6)


def small(**kw) -> SimConfig:
    return SimConfig(**{**SMALL, **kw})


def _disk(shape, y, x, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - y) ** 2 + (xx - x) ** 2 <= r * r


@pytest.fixture(scope="module")
def mix_scene():
    """The default dust mix (25 particles) on a 240 x 320 sensor."""
    return make_scene(SimConfig(height=240, width=320, n_frames=4, seed=3))


@pytest.fixture(scope="module")
def donut_scene():
    return make_scene(SimConfig(height=240, width=320, n_frames=4, seed=5, central_obstruction=0.4))


# -- reproducibility ---------------------------------------------------------------------------

def test_same_seed_gives_identical_frames_in_any_order():
    a, b = make_scene(small(seed=7)), make_scene(small(seed=7))
    np.testing.assert_array_equal(a.true_flat, b.true_flat)
    np.testing.assert_array_equal(a.shifts, b.shifts)
    forward = [render_frame(a, i) for i in range(3)]
    backward = [render_frame(b, i) for i in (2, 1, 0)][::-1]
    for f, g in zip(forward, backward):
        np.testing.assert_array_equal(f, g)
    assert not np.array_equal(forward[0], forward[1])  # frames differ (noise, motion)


def test_different_seeds_differ():
    a, b = make_scene(small(seed=1)), make_scene(small(seed=2))
    assert not np.array_equal(a.true_flat, b.true_flat)
    assert not np.array_equal(render_frame(a, 0), render_frame(b, 0))
    assert not np.array_equal(a.shifts, b.shifts)


def test_iter_frames_matches_render_frame():
    scene = make_scene(small(n_frames=4))
    frames = list(iter_frames(scene, 1, 3))
    assert len(frames) == 2
    np.testing.assert_array_equal(frames[1], render_frame(scene, 2))
    with pytest.raises(IndexError):
        render_frame(scene, 4)


# -- the true flat ------------------------------------------------------------------------------

def test_flat_is_exactly_one_away_from_dust(mix_scene):
    flat = mix_scene.true_flat
    assert flat.dtype == np.float32 and flat.shape == (240, 320)
    near = np.zeros(flat.shape, bool)
    for obj in mix_scene.dust_objects:
        # shadow + rim blur (<= 4 x 3 px) + patch rounding
        reach = 0.5 * obj["footprint_px"] + obj["particle_px"] + 16
        near |= _disk(flat.shape, obj["y"], obj["x"], reach)
    assert np.all(flat[~near] == 1.0)
    assert np.count_nonzero(flat == 1.0) > 0.3 * flat.size
    assert np.all(mix_scene.dust_labels[flat == 1.0] == 0)


def test_no_dust_gives_a_flat_of_exactly_one():
    scene = make_scene(small(dust=False))
    assert np.all(scene.true_flat == 1.0)
    assert not scene.dust_mask.any() and scene.dust_objects == []
    frame = render_frame(scene, 0).astype(np.float64)
    # the frame is then the clean Sun plus noise only: residual ~ N(0, sqrt(S + 3^2)) per pixel
    resid = frame - clean_sun(scene, 0)
    assert abs(resid.mean()) < 5.0


def test_dust_mix_has_strong_medium_and_faint_large(mix_scene):
    objs = mix_scene.dust_objects
    assert len(objs) == 25
    depths = np.array([o["depth"] for o in objs])
    strong = depths > 0.10
    medium = (depths >= 0.03) & (depths <= 0.10)
    faint_large = [o for o in objs if o["depth"] <= 0.05 and o["footprint_px"] > 40]
    assert strong.sum() >= 5 and medium.sum() >= 5 and len(faint_large) >= 3
    assert depths.max() <= 0.6 and depths.min() >= 0.01
    # near dust is small and dark, far dust large and faint
    near = [o for o in objs if o["kind"] == "near"]
    far = [o for o in objs if o["kind"] == "far"]
    assert max(o["footprint_px"] for o in near) < min(o["footprint_px"] for o in far)
    assert min(o["depth"] for o in near) > max(o["depth"] for o in far)
    # footprint = distance / f_ratio, in pixels
    for o in objs:
        assert o["footprint_px"] == pytest.approx(o["distance_mm"] / 30.0 / 3.75e-3, rel=1e-9)


def test_depths_labels_and_flat_agree(mix_scene):
    flat, labels = mix_scene.true_flat, mix_scene.dust_labels
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(mix_scene.dust_mask, labels > 0)
    for o in mix_scene.dust_objects:
        region = labels == o["label"]
        assert region.sum() == o["area_px"] > 0
        # overlapping shadows multiply, so the flat may be a little deeper than one object alone
        assert 1 - flat[region].min() >= o["depth"] - 1e-4
        if o["kind"] == "near":  # small, isolated: the flat's minimum is the object's own depth
            assert 1 - flat[region].min() == pytest.approx(o["depth"], abs=2e-3)
    # every labelled pixel attenuates by more than 1%, up to its neighbours' rims (<= 3%)
    assert flat[labels > 0].max() < 1.0 + 0.03


def test_rims_are_bright_and_faint(mix_scene):
    flat = mix_scene.true_flat
    h, w = flat.shape
    checked = 0
    for o in mix_scene.dust_objects:
        assert 0.003 < o["rim"] <= 0.031
        r = 0.5 * o["footprint_px"] + o["particle_px"] + 8
        if not (r < o["y"] < h - r and r < o["x"] < w - r):
            continue
        ring = _disk(flat.shape, o["y"], o["x"], r) & ~_disk(flat.shape, o["y"], o["x"], 0.5 * o["footprint_px"] - 1)
        assert flat[ring].max() > 1.0 + 0.5 * o["rim"]
        checked += 1
    assert checked >= 10


def test_far_dust_makes_donuts_with_obstruction(donut_scene, mix_scene):
    flat = donut_scene.true_flat
    far = [o for o in donut_scene.dust_objects if o["kind"] == "far"]
    assert far and all(o["donut"] for o in far)
    for o in far:
        iy, ix = int(round(o["y"])), int(round(o["x"]))
        ring = _disk(flat.shape, o["y"], o["x"], 0.5 * o["footprint_px"])
        # the centre of the donut is much brighter than its ring
        assert flat[iy, ix] > flat[ring].min() + 0.5 * o["depth"]
    # no obstruction: no donuts, the centre of a far shadow is its darkest part
    for o in (o for o in mix_scene.dust_objects if o["kind"] == "far"):
        assert not o["donut"]
        iy, ix = int(round(o["y"])), int(round(o["x"]))
        assert 1 - mix_scene.true_flat[iy, ix] > 0.8 * o["depth"]


# -- the Sun, motion and frames -----------------------------------------------------------------

def test_dark_features_are_dark_and_not_dust():
    cfg = small(height=160, width=192, drift_px=0.0, jitter_px=0.0, n_dust=8, n_sunspots=2, n_pores=5,
                seed=4)
    scene = make_scene(cfg)
    assert np.all(scene.shifts == 0)
    assert len(scene.dark_features) == 7
    assert not (scene.dark_feature_mask & scene.dust_mask).any()
    frame = render_frame(scene, 0).astype(np.float64)
    for feat in scene.dark_features:
        y, x, r = feat["y"], feat["x"], feat["radius_px"]
        assert scene.dark_feature_mask[int(round(y)), int(round(x))]
        core = _disk(frame.shape, y, x, max(0.5 * r, 1.0))
        around = _disk(frame.shape, y, x, r + 9) & ~_disk(frame.shape, y, x, r + 4)
        assert frame[core].mean() < 0.85 * np.median(frame[around]), feat
        assert not scene.dust_mask[core].any()


def test_shifts_follow_drift_and_jitter():
    scene = make_scene(small(n_frames=80, drift_px=12.0, jitter_px=1.5, seed=11))
    s = scene.shifts
    assert s.shape == (80, 2)
    np.testing.assert_allclose(s.mean(axis=0), 0.0, atol=1e-9)
    t = np.arange(80)
    fits = [np.polyfit(t, s[:, k], 1) for k in range(2)]
    drift = math.hypot(fits[0][0], fits[1][0]) * 79
    # slope error from 1.5 px jitter over 80 frames: ~0.2 px rms on the total drift
    assert drift == pytest.approx(12.0, abs=1.0)
    resid = np.concatenate([s[:, k] - np.polyval(fits[k], t) for k in range(2)])
    assert resid.std() == pytest.approx(1.5, rel=0.2)  # 160 samples: ~6% rms error
    assert np.any(np.abs(s - np.round(s)) > 0.1)  # sub-pixel
    still = make_scene(small(drift_px=0.0, jitter_px=0.0))
    assert np.all(still.shifts == 0)


def test_sun_moves_by_the_true_shift_and_dust_does_not():
    scene = make_scene(small(seeing_blur_px=0.0, n_frames=2))
    p, h, w = scene.pad, 128, 160
    scene.shifts[1] = (3.0, -2.0)  # integer shift: the Fourier shift is then an exact roll
    moved = clean_sun(scene, 1)
    np.testing.assert_allclose(moved, scene.sun_canvas[p - 3: p - 3 + h, p + 2: p + 2 + w],
                               rtol=1e-4, atol=0.05)
    np.testing.assert_allclose(expected_frame(scene, 1), moved * scene.true_flat, rtol=1e-6)


def test_seeing_blur_varies_and_smooths():
    scene = make_scene(small(n_frames=8, seeing_blur_px=1.5, jitter_px=0.0, drift_px=0.0))
    sig = scene.blur_sigmas
    assert np.all((sig >= 0.75) & (sig <= 2.7)) and sig.std() > 0
    sharp = make_scene(small(n_frames=8, seeing_blur_px=0.0, jitter_px=0.0, drift_px=0.0))
    assert np.all(sharp.blur_sigmas == 0)
    # blur lowers the pixel-to-pixel texture contrast of the same Sun
    grad = lambda a: np.abs(np.diff(a, axis=1)).mean()  # noqa: E731
    assert grad(clean_sun(scene, 0)) < 0.8 * grad(clean_sun(sharp, 0))


def test_frame_mean_and_noise():
    scene = make_scene(small(n_frames=2, signal_adu=20000.0, photons_per_adu=2.0, read_noise_adu=4.0))
    frame = render_frame(scene, 0)
    assert frame.dtype == np.uint16 and frame.shape == (128, 160)
    # the Sun is normalised to a disk mean of signal_adu; dust removes ~1% on average
    assert frame.mean() == pytest.approx(20000.0, rel=0.03)
    resid = frame - expected_frame(scene, 0).astype(np.float64)
    # shot + read noise: sqrt(S / g + r^2) ~ 100 ADU; 20k samples -> ~1% error on the std
    expected_sd = np.sqrt(np.mean(expected_frame(scene, 0)) / 2.0 + 16.0)
    assert resid.std() == pytest.approx(expected_sd, rel=0.05)
    assert abs(resid.mean()) < 2.0


def test_low_light_is_poisson():
    scene = make_scene(small(n_frames=1, signal_adu=20.0, read_noise_adu=0.0, photons_per_adu=1.0))
    frame = render_frame(scene, 0).astype(np.float64)
    mean = expected_frame(scene, 0).astype(np.float64)
    resid = frame - mean
    # Poisson: variance = mean (20 photons); 20k samples -> ~1.5% error on the variance
    assert resid.var() == pytest.approx(mean.mean(), rel=0.08)
    assert abs(resid.mean()) < 0.2


def test_uint16_clips_without_wrapping():
    scene = make_scene(small(n_frames=1, signal_adu=60000.0, texture="halpha", dust=False))
    frame = render_frame(scene, 0)
    mean = expected_frame(scene, 0)
    assert frame.dtype == np.uint16
    # shot noise at 66000 ADU is ~257 ADU rms: 6 sigma above 65535 is certainly clipped
    over = mean > 65535 + 6 * np.sqrt(66000.0 + 9.0)
    assert over.sum() > 100  # the scene really overflows 16 bits
    assert np.all(frame[over] == 65535)  # clipped, never wrapped to small values
    assert frame.max() == 65535
    assert frame[mean > 50000].min() > 40000  # nothing wrapped around to small values


@pytest.mark.parametrize("texture", TEXTURES)
def test_every_texture_renders_with_a_limb(texture):
    scene = make_scene(small(texture=texture, limb=True, n_frames=1))
    frame = render_frame(scene, 0).astype(np.float64)
    cy, cx = scene.sun["disk_center_yx"]
    radius = scene.sun["disk_radius_px"]
    yy, xx = np.mgrid[:128, :160]
    dist = np.hypot(yy - cy, xx - cx)
    on, sky = dist < radius - 10, dist > radius + 10
    assert on.sum() > 1000 and sky.sum() > 500
    assert np.median(frame[sky]) < 0.05 * np.median(frame[on])
    # fine texture: a few % rms on the disk, well above the shot noise (~0.6%)
    disk = clean_sun(scene, 0)[on]
    assert 0.01 < np.std(np.diff(clean_sun(scene, 0), axis=1)[on[:, 1:]]) / disk.mean() < 0.2


def test_invalid_config_is_refused():
    with pytest.raises(ValueError, match="texture"):
        make_scene(small(texture="xray"))
    with pytest.raises(ValueError, match="central_obstruction"):
        make_scene(small(central_obstruction=1.2))


# -- files --------------------------------------------------------------------------------------

def test_simulate_writes_readable_truth(tmp_path):
    from aiflat_local.io import read_image, read_mask
    from aiflat_local.io.ser import SerReader

    cfg = small(n_frames=4, height=96, width=128, n_dust=6, seed=9)
    paths = simulate(tmp_path / "sim", cfg)
    scene = make_scene(cfg)
    with SerReader(paths.video) as ser:
        assert (ser.n_frames, ser.height, ser.width, ser.dtype) == (4, 96, 128, np.dtype(np.uint16))
        for i in range(4):
            np.testing.assert_array_equal(ser.frame(i), render_frame(scene, i))
        assert len(ser.timestamps) == 4
    flat, _ = read_image(paths.true_flat)
    np.testing.assert_array_equal(flat, scene.true_flat)
    labels, _ = read_image(paths.dust_labels)
    np.testing.assert_array_equal(labels.astype(np.int32), scene.dust_labels)
    np.testing.assert_array_equal(read_mask(paths.dust_mask), scene.dust_mask)
    np.testing.assert_array_equal(read_mask(paths.dark_features), scene.dark_feature_mask)
    truth = json.loads(paths.truth.read_text())
    assert truth["config"]["seed"] == 9 and truth["config"]["n_frames"] == 4
    assert len(truth["objects"]) == 6
    assert {"label", "y", "x", "distance_mm", "footprint_px", "depth", "rim", "donut"} <= set(truth["objects"][0])
    np.testing.assert_allclose(truth["shifts"], scene.shifts)
    assert "numpy" in truth["versions"] and "aiflat_local" in truth["versions"]
    assert not list(paths.directory.glob("*.part"))


# -- more physics: footprint, labels, motion, noise switches --------------------------------------

def test_depth_is_particle_area_over_footprint_area():
    """Medium and far dust: the particle sits inside the footprint, so the shadow's
    plateau is A_particle / A_footprint = (p / D)^2 / (1 - c^2). 10 % covers the
    particle's irregular outline (area of its radial harmonics) and pixel sampling."""
    for c in (0.0, 0.4):
        scene = make_scene(SimConfig(height=240, width=320, n_frames=2, seed=8, central_obstruction=c))
        checked = 0
        for o in scene.dust_objects:
            if o["kind"] == "near":
                assert 0.10 < o["depth"] <= 0.6  # near: strong, capped (not perfectly opaque)
                continue
            ratio = (o["particle_px"] / o["footprint_px"]) ** 2 / (1 - c * c)
            assert o["depth"] == pytest.approx(ratio, rel=0.10), o
            checked += 1
        assert checked >= 10


def test_labels_are_where_an_isolated_object_changes_the_flat_by_one_percent():
    scene = make_scene(small(n_dust=4, seed=2, n_sunspots=0, n_pores=0))
    flat, labels = scene.true_flat, scene.dust_labels
    boxes = [o["bbox"] for o in scene.dust_objects]
    checked = 0
    for o in scene.dust_objects:
        y0, y1, x0, x1 = o["bbox"]
        alone = all(b is o["bbox"] or min(y1, b[1]) <= max(y0, b[0]) or min(x1, b[3]) <= max(x0, b[2])
                    for b in boxes)
        if not alone or min(o["bbox"]) == 0 or o["bbox"][1] == 128 or o["bbox"][3] == 160:
            continue  # touched by a neighbour's tails or cut by the frame edge
        box = (slice(y0, y1), slice(x0, x1))
        np.testing.assert_array_equal(labels[box] == o["label"], np.abs(flat[box] - 1.0) > 0.01)
        assert flat[box].max() == pytest.approx(1.0 + o["rim"], abs=1e-6) and flat[box].max() > 1.0
        assert flat[box].min() == pytest.approx(1.0 - o["depth"], abs=1e-6)
        checked += 1
    assert checked >= 2
    # outside every object's bbox the flat is untouched
    touched = np.zeros(flat.shape, bool)
    for y0, y1, x0, x1 in boxes:
        touched[y0:y1, x0:x1] = True
    assert np.all(flat[~touched] == 1.0) and not labels[~touched].any()


def test_rim_lies_outside_the_shadow():
    scene = make_scene(small(n_dust=6, seed=5))
    flat = scene.true_flat
    checked = 0
    for o in scene.dust_objects:
        if o["overlaps_dust"] or min(o["bbox"]) == 0 or o["bbox"][1] == 128 or o["bbox"][3] == 160:
            continue  # touched by a neighbour or cut by the frame edge
        checked += 1
        y0, y1, x0, x1 = o["bbox"]
        patch = flat[y0:y1, x0:x1]
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dist = np.hypot(yy - o["y"], xx - o["x"])
        # the brightest rim pixel is farther out than the darkest shadow pixel
        assert dist.ravel()[patch.argmax()] > dist.ravel()[patch.argmin()]
        assert patch.max() > 1.0
    assert checked >= 3


def test_overlap_records_are_truthful():
    # a crowded 64 x 80 sensor, where sunspots cannot all avoid the dust
    scene = make_scene(small(height=64, width=80, n_dust=12, n_sunspots=2, n_pores=8, seed=1))
    labels = scene.dust_labels
    hit = set(np.unique(labels[scene.dark_feature_mask]).tolist()) - {0}
    assert hit  # the case is really crowded
    for o in scene.dust_objects:
        assert o["overlaps_dark_feature"] == (o["label"] in hit)
    assert set().union(*(set(f["overlaps_dust"]) for f in scene.dark_features)) == hit


def test_dark_features_move_with_the_sun():
    """The darkness centroid of a sunspot follows the true sub-pixel shift (no dust,
    no jitter, 12 px drift); 0.1 px covers the blur of its irregular outline."""
    cfg = small(n_frames=5, drift_px=12.0, jitter_px=0.0, seeing_blur_px=0.5, n_sunspots=1, n_pores=0,
                dust=False, texture="white_light")
    scene = make_scene(cfg)
    feat = scene.dark_features[0]
    yy, xx = np.mgrid[:128, :160]

    def centroid(i):
        img = clean_sun(scene, i).astype(np.float64)
        y0, x0 = feat["y"] + scene.shifts[i][0], feat["x"] + scene.shifts[i][1]
        dark = np.clip(1 - img / np.median(img), 0, None) * (np.hypot(yy - y0, xx - x0) < feat["radius_px"] + 6)
        dark[dark < 0.1] = 0
        return np.array([(dark * yy).sum(), (dark * xx).sum()]) / dark.sum()

    c0, c4 = centroid(0), centroid(4)
    np.testing.assert_allclose(c4 - c0, scene.shifts[4] - scene.shifts[0], atol=0.1)
    np.testing.assert_allclose(c0, [feat["y"] + scene.shifts[0][0], feat["x"] + scene.shifts[0][1]], atol=1.0)
    assert np.hypot(*(scene.shifts[4] - scene.shifts[0])) == pytest.approx(12.0, abs=1e-9)


def test_subpixel_shift_matches_interpolation():
    """A (0.5, -0.25) px shift with sigma-1 blur equals a quintic-spline shift of the
    Gaussian-blurred canvas to 0.2 % of the texture's rms (the two interpolators differ
    only near the Nyquist frequency, which the blur removes)."""
    scene = make_scene(small(n_frames=2))
    scene.shifts[1] = (0.5, -0.25)
    scene.blur_sigmas[1] = 1.0
    p = scene.pad
    ref = ndimage.shift(ndimage.gaussian_filter(scene.sun_canvas.astype(np.float64), 1.0), (0.5, -0.25), order=5)
    got = clean_sun(scene, 1)
    err = got - ref[p:p + 128, p:p + 160]
    assert err.std() < 0.002 * got.std()


def test_dust_stays_on_the_sensor():
    """Noise off: every frame is exactly clean_sun x true_flat, quantised."""
    scene = make_scene(small(n_frames=3, photons_per_adu=math.inf, read_noise_adu=0.0))
    for i in range(3):
        expected = np.clip(np.rint(clean_sun(scene, i) * scene.true_flat), 0, 65535)
        np.testing.assert_array_equal(render_frame(scene, i), expected.astype(np.uint16))


def test_still_video_without_drift_jitter_or_blur():
    scene = make_scene(small(n_frames=4, drift_px=0.0, jitter_px=0.0, seeing_blur_px=0.0))
    np.testing.assert_array_equal(clean_sun(scene, 0), clean_sun(scene, 3))
    p = scene.pad
    np.testing.assert_allclose(clean_sun(scene, 0), scene.sun_canvas[p:p + 128, p:p + 160], rtol=1e-5, atol=0.05)


def test_limb_scene_keeps_dust_and_features_on_the_disk():
    scene = make_scene(small(limb=True, n_dust=6, n_pores=3, n_sunspots=1, seed=12))
    cy, cx = scene.sun["disk_center_yx"]
    radius = scene.sun["disk_radius_px"]
    for item in scene.dust_objects + scene.dark_features:
        assert math.hypot(item["y"] - cy, item["x"] - cx) < radius, item


def test_blur_sigmas_and_shifts_are_per_frame_and_reproducible():
    a = make_scene(small(n_frames=12, seed=21))
    b = make_scene(small(n_frames=12, seed=21, n_dust=3, texture="cak"))
    # motion draws from its own random stream: dust and texture choices do not change it
    np.testing.assert_array_equal(a.shifts, b.shifts)
    np.testing.assert_array_equal(a.blur_sigmas, b.blur_sigmas)
    assert len(np.unique(a.blur_sigmas)) == 12

"""The classical masker on seeded synthetic images (own helper and the project simulator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from aiflat_local.errors import InputError
from aiflat_local.masks import MASKERS
from aiflat_local.masks.classical import ClassicalMasker, plausible_depth
from aiflat_local.metrics import dark_feature_leakage, recall_by_depth


def _disk_profile(shape, cy, cx, radius, edge):
    """Flat-topped disk (1 inside, 0 outside) with a linear edge *edge* px wide."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    r = np.hypot(y - cy, x - cx)
    return np.clip((radius + edge / 2 - r) / edge, 0.0, 1.0)


def _dusty_image(seed=0, shape=(192, 256)):
    """A small dusty 'temporal median': textured Sun x sunspots x dust, plus noise.

    Returns ``(image, dust_labels, depth_per_label, sunspot_mask)``. Dust is a
    flat-topped shadow (the footprint) with a soft edge and a faint bright rim;
    sunspots have a deep umbra (75 % dark) inside a 25 % penumbra, bigger than
    any plausible dust shadow that deep.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 2.5)
    texture *= 0.012 / texture.std()
    sun = 1000.0 * (1 + 0.08 * np.sin(xx / 45.0) * np.cos(yy / 60.0)) * (1 + texture)
    spots = np.ones(shape)
    spot_mask = np.zeros(shape, bool)
    for cy, cx in ((40, 215), (150, 40)):
        pen = _disk_profile(shape, cy, cx, 16, 3)
        umb = _disk_profile(shape, cy, cx, 7, 2)
        spots *= (1 - 0.25 * pen) * (1 - (0.75 - 0.25) / 0.75 * umb)
        spot_mask |= pen > 0.2
    flat = np.ones(shape)
    labels = np.zeros(shape, np.int32)
    depth = {}
    # dust on a jittered grid, away from the sunspots
    k = 0
    for gy in range(24, h - 20, 42):
        for gx in range(28, w - 20, 50):
            cy, cx = gy + rng.uniform(-5, 5), gx + rng.uniform(-5, 5)
            y0, x0 = max(int(cy) - 22, 0), max(int(cx) - 22, 0)
            if spot_mask[y0:int(cy) + 22, x0:int(cx) + 22].any():
                continue
            k += 1
            radius = rng.uniform(2.0, 9.0)
            d = rng.uniform(0.12, 0.5) if k % 4 else rng.uniform(0.04, 0.08)
            prof = _disk_profile(shape, cy, cx, radius, max(1.0, 0.4 * radius))
            rim = (_disk_profile(shape, cy, cx, radius + 2.5, 2.0)
                   - _disk_profile(shape, cy, cx, radius + 0.5, 2.0))
            flat *= 1 - d * prof + 0.1 * d * np.clip(rim, 0, 1)
            labels[(prof * d > 0.01) & (labels == 0)] = k
            depth[k] = d
    image = sun * spots * flat
    image += rng.normal(0, 2.0, shape)  # 0.2 % noise
    return image.astype(np.float32), labels, depth, spot_mask


@pytest.fixture(scope="module")
def dusty():
    return _dusty_image(seed=1)


def test_registry_builds_the_classical_masker():
    assert "classical" in MASKERS.names()
    m = MASKERS.create("classical", seed_sigma=6.0)
    assert isinstance(m, ClassicalMasker)
    assert m.name == "classical" and m.seed_sigma == 6.0
    assert not MASKERS.info("classical").needs_weights


def test_finds_deep_dust_and_leaves_sunspots(dusty):
    image, labels, depth, spots = dusty
    res = ClassicalMasker()(image)
    assert res.mask.dtype == np.float32 and set(np.unique(res.mask)) <= {0.0, 1.0}
    assert recall_by_depth(res.binary, labels, depth, 0.10) >= 0.95
    # the sunspots (umbra far deeper than dust of that size) are not masked
    assert dark_feature_leakage(res.binary, spots, labels > 0) == 0.0
    why = res.params["rejected"]
    assert why.get("too_dark", 0) + why.get("umbra_penumbra", 0) >= 2
    # objects are JSON-friendly records, one per kept object
    assert json.loads(json.dumps(res.objects)) == res.objects
    # touching shadows may be split, never merged away
    assert len(res.objects) >= ndimage.label(res.binary, np.ones((3, 3)))[1]
    assert sum(ob["area"] for ob in res.objects) == int(res.binary.sum())
    for k, ob in enumerate(res.objects, start=1):
        assert ob["label"] == k
        assert {"y", "x", "area", "depth", "diameter", "bbox"} <= set(ob)
        assert 0 < ob["depth"] < 1
    json.dumps(res.params)


def test_few_false_detections_on_the_texture(dusty):
    image, labels, depth, _ = dusty
    res = ClassicalMasker()(image)
    near_dust = ndimage.binary_dilation(labels > 0, iterations=3)
    lab, n = ndimage.label(res.binary, np.ones((3, 3)))
    false = [i for i in range(1, n + 1) if not (near_dust & (lab == i)).any()]
    assert len(false) <= 2, f"{len(false)} detections away from any dust"


def test_flat_images_give_an_empty_mask():
    rng = np.random.default_rng(0)
    for img in (np.full((96, 128), 500.0, np.float32),
                (500 + rng.normal(0, 2, (96, 128))).astype(np.float32),
                np.zeros((96, 128), np.float32)):
        res = ClassicalMasker()(img)
        assert not res.binary.any()
        assert res.objects == []


def test_mask_is_the_same_for_a_scaled_image(dusty):
    image = dusty[0]
    a = ClassicalMasker()(image).binary
    b = ClassicalMasker()(image * np.float32(7.5)).binary
    assert np.array_equal(a, b)


def test_sky_and_limb_are_not_dust():
    image, labels, depth, _ = _dusty_image(seed=2, shape=(160, 200))
    yy, xx = np.mgrid[0:160, 0:200]
    sky = np.hypot(yy - 330, xx - 100) > 260  # the limb crosses the top of the field
    image = np.where(sky, 15.0, image).astype(np.float32)
    res = ClassicalMasker()(image)
    near_limb = ndimage.binary_dilation(sky, iterations=8)
    assert not (res.binary & near_limb).any()
    on_disk = labels * ~ndimage.binary_dilation(sky, iterations=20)
    assert recall_by_depth(res.binary, on_disk, depth, 0.10) >= 0.9


def test_plausible_depth_falls_with_size():
    assert plausible_depth(10, 12, 0.95) == 0.95
    assert plausible_depth(36, 12, 0.95) == pytest.approx(0.25)
    assert plausible_depth(112, 12, 0.95) == pytest.approx(0.0144)


def test_input_errors():
    with pytest.raises(InputError, match="2-D"):
        ClassicalMasker()(np.ones((3, 32, 32), np.float32))
    with pytest.raises(InputError, match="finite"):
        ClassicalMasker()(np.full((32, 32), np.nan, np.float32))


def test_frames_tell_pores_and_sunspots_from_dust():
    """On the project's simulator, with frames: deep dust kept, solar features dropped."""
    synth = pytest.importorskip("aiflat_local.synth")
    cfg = synth.SimConfig(height=160, width=224, n_frames=16, seed=3, n_dust=10,
                          n_sunspots=2, n_pores=5)
    scene = synth.make_scene(cfg)
    frames = np.stack(list(synth.iter_frames(scene)))
    median = np.median(frames.astype(np.float32), axis=0)
    depth = {o["label"]: o["depth"] for o in scene.dust_objects}
    res = ClassicalMasker()(median, frames=frames)
    assert res.params["motion"]["usable"]
    assert recall_by_depth(res.binary, scene.dust_labels, depth, 0.10) >= 0.95
    assert dark_feature_leakage(res.binary, scene.dark_feature_mask, scene.dust_labels > 0) == 0.0
    # without frames the same detector cannot tell pores from dust
    json.dumps(res.params)
    assert res.params["rejected"].get("moves_with_sun", 0) >= 1
    alone = ClassicalMasker()(median)
    assert not alone.params["motion"]["usable"]


def test_frames_are_registered_by_the_motion_module():
    """The Sun-fixed test uses motion.register_frames: shifts within 0.1 px of the simulator's."""
    synth = pytest.importorskip("aiflat_local.synth")
    cfg = synth.SimConfig(height=160, width=224, n_frames=16, seed=3, n_dust=10)
    scene = synth.make_scene(cfg)
    frames = np.stack(list(synth.iter_frames(scene)))
    masker = ClassicalMasker()
    median = masker._prepare(np.median(frames.astype(np.float32), axis=0))
    strong = ndimage.binary_dilation(masker._multiscale(median)["z"] > masker.seed_sigma, iterations=3)
    reg = masker._register(median, strong, frames)  # as __call__ does: the strong dark spots left out
    assert reg["info"]["usable"]
    truth = np.asarray(scene.shifts)[reg["indices"]]
    error = reg["shifts"] - (truth - np.median(truth, axis=0))
    assert np.abs(error).max() < 0.1  # measured 0.046 px here (the former correlation with the median: 0.06-0.3 px rms)
    assert np.allclose(np.median(reg["scales"]), 1.0)


def test_frames_without_motion_or_of_another_shape_fall_back(dusty):
    image = dusty[0]
    alone = ClassicalMasker()(image)
    still = ClassicalMasker()(image, frames=[image] * 5)
    assert not still.params["motion"]["usable"]
    assert "too little motion" in still.params["motion"]["note"]
    assert np.array_equal(still.binary, alone.binary)

    class Reader:  # the SerReader duck type
        n_frames = 4

        def frame(self, i):
            return np.zeros((10, 10), np.uint16)

    other = ClassicalMasker()(image, frames=Reader())
    assert "differs" in other.params["motion"]["note"]
    assert np.array_equal(other.binary, alone.binary)


def test_frame_sample_of_more_than_48_frames_keeps_each_shift_with_its_frame():
    """register_sample asks motion.register_frames for every sampled frame, not its default 48."""
    from aiflat_local.masks._frames import register_sample
    from aiflat_local.synth import SimConfig, make_scene, render_frame

    scene = make_scene(SimConfig(height=96, width=128, n_frames=80, seed=5, n_dust=3, drift_px=6.0, jitter_px=2.0))
    frames = np.stack([render_frame(scene, i) for i in range(80)])
    sample, info = register_sample(frames, frames.shape[1:], n_frames=64)
    assert sample is not None and info["n_frames_read"] == 64
    assert len(sample.indices) == len(sample.shifts) == len(sample.scales) == 64
    truth = scene.shifts[sample.indices] - np.median(scene.shifts[sample.indices], axis=0)
    assert np.sqrt(np.mean((sample.shifts - truth) ** 2)) < 0.25

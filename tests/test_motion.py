"""Tests of the flat from motion (aiflat_local.motion) and the "motion" masker.

Small seeded simulated videos (128 x 160 to 160 x 200, 24-32 frames, drift and
seeing jitter) keep each test to a second or two. Tolerances are stated where
they are not exact identities.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from aiflat_local import motion as M
from aiflat_local.flat import build_flat
from aiflat_local.metrics import flat_error
from aiflat_local.synth import SimConfig, make_scene, render_frame


def _video(**kw):
    cfg = SimConfig(**{"height": 128, "width": 160, "n_frames": 24, "seed": 1, "n_dust": 6, "n_sunspots": 1,
                       "n_pores": 3, **kw})
    scene = make_scene(cfg)
    frames = np.stack([render_frame(scene, i) for i in range(cfg.n_frames)])
    return scene, frames


@pytest.fixture(scope="module")
def small():
    return _video()


@pytest.fixture(scope="module")
def medium():
    return _video(height=160, width=200, n_frames=32, seed=1)


def _relative(shifts: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Shift errors after removing the common offset (the reference frame's own position)."""
    return (shifts - shifts.mean(axis=0)) - (truth - truth.mean(axis=0))


# --------------------------------------------------------------------------- registration
def test_registration_within_0_2_px_of_the_truth(small, tmp_path):
    """Both the first registration (raw frames) and the final one (dust left out) are well inside 0.2 px."""
    from aiflat_local.io.ser import SerReader, write_ser

    scene, frames = small
    path = write_ser(tmp_path / "v.ser", iter(frames))
    with SerReader(path) as reader:
        reg = M.register_frames(reader)
        mf = M.motion_flat(reader)
    assert reg.frame_indices.tolist() == list(range(24))
    assert reg.shifts[reg.frame_indices == reg.reference_index].tolist() == [[0.0, 0.0]]
    first = np.abs(_relative(reg.shifts, scene.shifts)).max()
    final = np.abs(_relative(mf.registration.shifts, scene.shifts[mf.registration.frame_indices])).max()
    assert first < 0.2
    assert final < 0.1  # measured ~0.02 px
    assert np.all(mf.registration.uncertainty >= 0) and np.all(np.isfinite(mf.registration.uncertainty))
    json.dumps(mf.registration.to_dict())


def test_registration_selects_evenly_spaced_frames():
    idx = M.select_frames(200, None, 48)
    assert len(idx) == 48 and idx[0] == 0 and idx[-1] == 199 and np.all(np.diff(idx) > 0)
    assert M.select_frames(10, [3, 1, 3], 48).tolist() == [1, 3]


# --------------------------------------------------------------------------- the solver
def _exact_scene(n: int = 20, shape=(72, 88), seed: int = 0):
    """Log frames ``G + s(x - d_k)`` with integer shifts (exact), a smooth gain with one deep wide dip."""
    rng = np.random.default_rng(seed)
    h, w = shape
    pad = 10
    sun = ndimage.gaussian_filter(rng.standard_normal((h + 2 * pad, w + 2 * pad)), 1.5) * 0.3
    yy, xx = np.mgrid[:h, :w]
    gain = -0.4 * np.exp(-((yy - 30) ** 2 + (xx - 40) ** 2) / (2 * 9.0 ** 2))  # a wide deep shadow
    gain += -0.2 * np.exp(-((yy - 50) ** 2 + (xx - 65) ** 2) / (2 * 2.0 ** 2))  # a small one
    shifts = rng.integers(-5, 6, size=(n, 2)).astype(float)
    frames = [gain + sun[pad - int(dy): pad - int(dy) + h, pad - int(dx): pad - int(dx) + w] for dy, dx in shifts]
    return gain, shifts, frames


def _solve_exact(solver: str, iterations: int = 50):
    gain, shifts, frames = _exact_scene()
    system = M._PairSystem(gain.shape, shifts, taper_px=6, eps=1e-6)
    for k, f in enumerate(frames):
        system.add_frame(k, f.astype(np.float32))
    b = system.rhs()
    if solver == "cg":
        g, _ = M._pcg(system, b, None, tol=1e-6, max_iter=500)
    else:
        g, _ = M.kll_fixed_point(system, b, iterations)
    h, w = gain.shape
    est = g[:h, :w]
    inside = system.coverage() >= 0.5
    est = est - np.median(est[inside] - gain[inside])
    return np.abs(est - gain)[inside].max()


def test_pair_system_recovers_an_exact_gain():
    """Integer shifts, no noise: the all-pairs solve gives the log gain to 1e-3 (float32 FFTs)."""
    assert _solve_exact("cg") < 1e-3


def test_conjugate_gradients_beat_the_kll_fixed_point():
    """The classic fixed point (Jacobi) stalls on the wide dip; CG does not (same equations)."""
    kll = _solve_exact("kll", iterations=50)
    cg = _solve_exact("cg")
    assert kll > 10 * cg and kll > 0.01


def test_torch_backend_matches_numpy():
    pytest.importorskip("torch")
    gain, shifts, frames = _exact_scene(n=8, shape=(40, 48))
    a = M._PairSystem(gain.shape, shifts + 0.3, taper_px=6, eps=1e-4)
    b = M._PairSystem(gain.shape, shifts + 0.3, taper_px=6, eps=1e-4, xp=M._backend("torch-cpu"))
    for k, f in enumerate(frames):
        a.add_frame(k, f.astype(np.float32))
        b.add_frame(k, f.astype(np.float32))
    ra, rb = a.rhs(), b.xp.numpy(b.rhs())
    assert np.allclose(ra, rb, atol=1e-4 * np.abs(ra).max())
    v = np.random.default_rng(1).standard_normal(a.cshape).astype(np.float32)
    aa, ab = a.apply(v), b.xp.numpy(b.apply(b.xp.asarray(v)))
    assert np.allclose(aa, ab, atol=1e-4 * np.abs(aa).max())


# --------------------------------------------------------------------------- the motion flat
def test_motion_flat_beats_the_single_median_flat(medium):
    """Strong dust (deeper than 10 %): at least 3x smaller flat error than median + inpainting (measured ~25x)."""
    from aiflat_local.pipeline import RunOptions, make_flat

    scene, frames = medium
    mf = M.motion_flat(frames)
    assert mf.used
    mask, objects = M.evidence_mask(mf)
    reference = np.median(frames, axis=0).astype(np.float32)
    motion = build_flat(reference, mask, gain=mf.gain).flat
    single, _, _ = make_flat(reference, scene.dust_mask, RunOptions(progress=False))  # even with the true mask
    deep = np.isin(scene.dust_labels, [o["label"] for o in scene.dust_objects if o["depth"] > 0.1])
    deep &= mf.support
    e_motion = flat_error(motion, scene.true_flat, deep)["median"]
    e_single = flat_error(single.flat, scene.true_flat, deep)["median"]
    assert e_motion < 0.004  # the target, measured ~0.1 %
    assert e_single > 3 * e_motion
    assert all(o["stationarity"] is not None and o["stationarity"] >= 0.1 for o in objects)
    json.dumps(mf.to_dict())


def test_motion_soft_mask_leaves_insignificant_pixels_exactly_one(medium):
    """The motion route's soft mask: 1 on the mask, 0 where the gain is indistinguishable from 1, as accurate."""
    from aiflat_local.flat import FlatParams, expand_mask, soft_mask

    scene, frames = medium
    mf = M.motion_flat(frames)
    mask, _ = M.evidence_mask(mf)
    reference = np.median(frames, axis=0).astype(np.float32)
    fixed = soft_mask(mask, 3, 1.5)
    w = M.motion_soft_mask(mf, mask, reach_px=3, outside=fixed)
    assert w.dtype == np.float32 and w.min() >= 0 and w.max() <= 1
    assert np.all(w[mask] == 1.0)
    trusted = ndimage.binary_erosion(mf.support, iterations=7)  # the support's own 6 px transition excluded
    assert np.all(w[trusted & ~expand_mask(mask, 3)] == 0.0)
    assert np.count_nonzero(w) < 0.9 * np.count_nonzero(fixed)
    assert np.all(w[~mf.support] == np.maximum(fixed, mask)[~mf.support])
    params = FlatParams(3, 1.5)
    new = build_flat(reference, mask, gain=mf.gain, params=params, weight=w)
    old = build_flat(reference, mask, gain=mf.gain, params=params)
    assert np.all(new.flat[w == 0] == 1.0)
    assert new.stats["fraction_exactly_one"] > old.stats["fraction_exactly_one"]
    deep = np.isin(scene.dust_labels, [o["label"] for o in scene.dust_objects if o["depth"] > 0.1]) & mf.support
    e_new = flat_error(new.flat, scene.true_flat, deep)["median"]
    e_old = flat_error(old.flat, scene.true_flat, deep)["median"]
    assert e_new < 0.004 and e_new <= e_old + 0.0005
    with pytest.raises(ValueError):
        M.motion_soft_mask(mf, mask[:10])


def test_support_reaches_close_to_the_frame_edge(medium):
    """The gain is trusted to ~5 px from the frame edge, and it is as accurate there (measured ~0.1 %)."""
    scene, frames = medium
    mf = M.motion_flat(frames)
    h, w = mf.gain.shape
    assert mf.support[h // 2, 6] and mf.support[h // 2, w - 7] and mf.support[6, w // 2] and mf.support[h - 7, w // 2]
    band = np.zeros((h, w), bool)
    band[4:-4, 4:-4] = True
    band[9:-9, 9:-9] = False
    band &= mf.support
    assert band.sum() > 1000
    assert np.median(np.abs(mf.gain[band] / scene.true_flat[band] - 1)) < 0.003


def test_sunspot_only_video_gives_a_flat_of_exactly_one():
    """No dust: nothing is masked (sunspots and pores move with the Sun), so the flat is 1.0 everywhere."""
    scene, frames = _video(dust=False, n_sunspots=2, n_pores=5, seed=4)
    mf = M.motion_flat(frames)
    assert mf.used
    mask, objects = M.evidence_mask(mf)
    assert not mask.any() and objects == []
    flat = build_flat(np.median(frames, axis=0).astype(np.float32), mask, gain=mf.gain).flat
    assert np.all(flat == 1.0)


def test_still_video_falls_back_and_says_why():
    scene, frames = _video(drift_px=0.0, jitter_px=0.0, seed=2)
    mf = M.motion_flat(frames)
    assert not mf.used
    assert "barely moves" in mf.reason and "appearance" in mf.reason
    assert np.all(mf.gain == 1.0) and not mf.support.any()
    assert M.evidence_mask(mf)[0].sum() == 0
    entry = mf.to_dict()
    assert entry["used"] is False and entry["reason"] == mf.reason
    json.dumps(entry)


def test_single_frame_falls_back():
    scene, frames = _video(n_frames=1, seed=2)
    mf = M.motion_flat(frames)
    assert not mf.used and "only 1 frame" in mf.reason


def test_motion_along_one_line_is_not_enough():
    t = np.linspace(-3, 3, 20)
    reg = M.Registration(shifts=np.c_[t, 0.5 * t], uncertainty=np.full((20, 2), 0.01),
                         frame_indices=np.arange(20), reference_index=10, rounds=1, method="test")
    used, reason = M.motion_decision(reg)
    assert not used and "one line" in reason
    jitter = np.random.default_rng(0).normal(0, 1.0, (20, 2))
    reg.shifts = reg.shifts + jitter
    assert M.motion_decision(reg)[0]


# --------------------------------------------------------------------------- references, blending
def test_aligned_median_is_sharp_and_bounded(small):
    """The Sun-aligned median matches the reference frame's Sun; bands of any height give the same result."""
    from aiflat_local.synth import clean_sun

    scene, frames = small
    ref = 12
    reg = M.Registration(shifts=scene.shifts - scene.shifts[ref], uncertainty=np.zeros((24, 2)),
                         frame_indices=np.arange(24), reference_index=ref, rounds=0, method="truth")
    a = M.aligned_median(frames, reg, flat=scene.true_flat)
    b = M.aligned_median(frames, reg, flat=scene.true_flat, max_memory_mb=0.2)
    assert np.array_equal(a, b) and a.dtype == np.float32
    sun = clean_sun(scene, ref)
    inner = (slice(10, -10), slice(10, -10))
    assert np.median(np.abs(a[inner] / sun[inner] - 1)) < 0.01  # photon noise + seeing, measured ~0.4 %
    sensor = np.median(frames, axis=0)
    assert np.median(np.abs(sensor[inner] / sun[inner] - 1)) > 2 * np.median(np.abs(a[inner] / sun[inner] - 1))


def test_blend_gains():
    motion = np.full((40, 40), 0.5, np.float32)
    other = np.full((40, 40), 0.9, np.float32)
    support = np.zeros((40, 40), bool)
    support[:, :20] = True
    out = M.blend_gains(motion, support, other)
    assert np.all(out[:, :14] == 0.5) and np.all(out[:, 20:] == np.float32(0.9))
    assert np.all(M.blend_gains(motion, np.ones((40, 40)), other) == 0.5)
    with pytest.raises(ValueError):
        M.blend_gains(motion, support[:10], other)


# --------------------------------------------------------------------------- the masker
def test_motion_masker_finds_dust_not_sunspots(medium):
    from aiflat_local.masks import MASKERS
    from aiflat_local.metrics import dark_feature_leakage, recall_by_depth

    assert MASKERS.info("motion").needs_frames
    scene, frames = medium
    reference = np.median(frames, axis=0).astype(np.float32)
    masker = MASKERS.create("motion")
    result = masker(reference, frames=frames)
    assert masker.motion is not None and masker.motion.used
    assert result.params["motion"]["used"] is True
    assert recall_by_depth(result.binary, scene.dust_labels, scene.dust_objects, 0.1) == 1.0
    assert dark_feature_leakage(result.binary, scene.dark_feature_mask, scene.dust_mask) == 0.0
    assert all(o["source"] for o in result.objects)
    json.dumps(result.params)
    json.dumps(result.objects)


def test_motion_masker_falls_back_without_motion():
    from aiflat_local.masks import MASKERS

    scene, frames = _video(drift_px=0.0, jitter_px=0.0, seed=2)
    reference = np.median(frames, axis=0).astype(np.float32)
    result = MASKERS.create("motion")(reference, frames=frames)
    appearance = MASKERS.create("dustnet")(reference, frames=frames)  # the default appearance masker
    assert result.params["motion"]["used"] is False and "barely moves" in result.params["motion"]["reason"]
    assert result.params["fallback"]["backend"] == "dustnet"
    assert np.array_equal(result.mask, appearance.mask)
    single = MASKERS.create("motion")(reference)
    assert single.params["motion"]["used"] is False and "single image" in single.params["motion"]["reason"]


def test_bayer_video(tmp_path):
    """A raw Bayer mosaic (per-site gains 1 / 0.7 / 0.4) is balanced per frame: same accuracy as mono."""
    from aiflat_local.io.ser import SerReader, SerWriter

    cfg = SimConfig(height=160, width=200, n_frames=32, seed=1, n_dust=6, n_sunspots=1, n_pores=3)
    scene = make_scene(cfg)
    sites = np.tile(np.array([[1.0, 0.7], [0.7, 0.4]], np.float32), (80, 100))
    with SerWriter(tmp_path / "bayer.ser", width=200, height=160, color_id=8) as writer:
        for i in range(cfg.n_frames):
            writer.write(np.clip(render_frame(scene, i) * sites, 0, 65535).astype(np.uint16))
    with SerReader(tmp_path / "bayer.ser") as reader:
        mf = M.motion_flat(reader)
    deep = np.isin(scene.dust_labels, [o["label"] for o in scene.dust_objects if o["depth"] > 0.1]) & mf.support
    assert mf.used and flat_error(mf.gain, scene.true_flat, deep)["median"] < 0.004  # measured ~0.1 %

"""The flat builder's rules, on seeded random inputs (DESIGN.md, "The flat builder's rules")."""

import numpy as np
import pytest

from aiflat_local.flat import (
    FlatParams, build_flat, expand_mask, inpaint_region, match_brightness, read_flat, soft_mask,
)
from aiflat_local.io import write_fits, write_tiff, write_xisf


def random_case(seed, shape=(96, 128), n_spots=6):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    clean = (1000 + 300 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + rng.normal(0, 5, shape)).astype(np.float32)
    true_flat = np.ones(shape)
    mask = np.zeros(shape, bool)
    for _ in range(n_spots):
        cy, cx, r = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8), rng.uniform(2, 6)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        true_flat *= 1 - rng.uniform(0.05, 0.5) * np.exp(-d2 / (2 * r * r))
        mask |= d2 <= (2 * r) ** 2
    return clean, (clean * true_flat).astype(np.float32), true_flat.astype(np.float32), mask


@pytest.mark.parametrize("seed", range(8))
def test_flat_is_exactly_one_outside_soft_mask_for_any_inpainting(seed):
    clean, reference, _, mask = random_case(seed)
    rng = np.random.default_rng(100 + seed)
    # A deliberately bad inpainting: every pixel changed, brightness shifted and scaled.
    bad = (reference * rng.uniform(0.5, 2.0) + rng.normal(0, 50, reference.shape)).astype(np.float32)
    result = build_flat(reference, mask, inpainted=bad)
    outside = result.soft_mask == 0
    assert outside.any()
    assert np.all(result.flat[outside] == np.float32(1.0))
    assert result.flat.dtype == np.float32
    assert np.all(np.isfinite(result.flat))


def test_perfect_inpainting_recovers_true_flat_in_dust():
    clean, reference, true_flat, mask = random_case(1)
    result = build_flat(reference, mask, inpainted=clean)
    w = result.soft_mask
    full = w == 1
    # Where the weight is 1 the flat is the exact ratio (float32 rounding only).
    np.testing.assert_allclose(result.flat[full], (reference / clean)[full], rtol=1e-6)
    np.testing.assert_allclose(result.flat[full], true_flat[full], rtol=1e-5)


def test_brightness_match_undoes_global_level_shift():
    clean, reference, true_flat, mask = random_case(2)
    shifted = clean * 1.3 + 40.0  # inpainter returned the right shape at the wrong level
    result = build_flat(reference, mask, inpainted=shifted)
    bm = result.stats["brightness_match"]
    assert bm["a"] == pytest.approx(1 / 1.3, rel=2e-3)
    full = result.soft_mask == 1
    assert np.median(np.abs(result.flat[full] / true_flat[full] - 1)) < 2e-3


def test_identity_brightness_match_is_exact():
    clean, reference, _, mask = random_case(3)
    same, info = match_brightness(reference.copy(), reference, ~mask)
    assert info["identity"] and np.array_equal(same, reference)


def test_rim_gain_above_one_is_kept_not_clipped():
    reference = np.full((40, 40), 100.0, np.float32)
    inpainted = reference.copy()
    reference[18:22, 18:22] = 103.0  # a bright diffraction rim: gain 1.03
    mask = np.zeros((40, 40), bool)
    mask[18:22, 18:22] = True
    result = build_flat(reference, mask, inpainted=inpainted)
    assert result.flat[20, 20] == pytest.approx(1.03, abs=1e-6)
    assert result.stats["n_bounded_high"] == 0


def test_gain_bounds_are_applied_and_counted():
    reference = np.full((30, 30), 100.0, np.float32)
    inpainted = reference.copy()
    reference[10, 10], reference[20, 20] = 1.0, 500.0  # gains 0.01 and 5.0
    mask = np.zeros((30, 30), bool)
    mask[10, 10] = mask[20, 20] = True
    result = build_flat(reference, mask, inpainted=inpainted, params=FlatParams(min_gain=0.05, max_gain=2.0))
    assert result.stats["n_bounded_low"] == 1 and result.stats["n_bounded_high"] == 1
    assert result.flat[10, 10] == pytest.approx(0.05) and result.flat[20, 20] == pytest.approx(2.0)


def test_divisions_are_guarded_and_counted():
    reference = np.full((30, 30), 100.0, np.float32)
    inpainted = reference.copy()
    inpainted[5, 5], inpainted[6, 6], inpainted[7, 7] = 0.0, -3.0, np.nan
    reference[8, 8] = 65535.0
    mask = np.zeros((30, 30), bool)
    mask[5:9, 5:9] = True
    result = build_flat(reference, mask, inpainted=inpainted, params=FlatParams(saturation=65535.0))
    assert result.stats["n_guarded"] == 4
    assert np.all(np.isfinite(result.flat))
    for y in (5, 6, 7, 8):
        assert result.flat[y, y] == 1.0


def test_soft_mask_defaults_match_original_tool():
    mask = np.zeros((101, 101), bool)
    mask[50, 50] = True
    w = soft_mask(mask)  # 10 px disk + Gaussian sigma 3
    assert w[50, 50] == 1.0
    assert w[50, 53] > 0.97  # well inside the 10 px disk
    assert 0.3 < w[50, 60] < 0.7  # at the disk edge the Gaussian is about half
    assert w[50, 75] == 0.0  # beyond 10 + 4 sigma: exactly zero
    assert w.min() >= 0 and w.max() <= 1
    assert np.array_equal(expand_mask(mask, 10.0), np.hypot(*np.mgrid[-50:51, -50:51]) <= 10)


def test_inpaint_region_is_soft_support():
    _, _, _, mask = random_case(4)
    region = inpaint_region(mask)
    assert np.array_equal(region, soft_mask(mask) > 0)
    assert region[mask].all()


def test_given_gain_path_and_argument_checks():
    ref = np.full((20, 20), 10.0, np.float32)
    mask = np.zeros((20, 20), bool)
    mask[10, 10] = True
    gain = np.ones((20, 20))
    gain[10, 10] = 0.8
    res = build_flat(ref, mask, gain=gain)
    assert res.flat[10, 10] == pytest.approx(0.8)
    with pytest.raises(ValueError):
        build_flat(ref, mask)
    with pytest.raises(ValueError):
        build_flat(ref, mask[:5], gain=gain)
    with pytest.raises(ValueError):
        FlatParams(min_gain=1.5)


@pytest.mark.parametrize("seed", range(4))
def test_given_soft_mask_keeps_the_rules(seed):
    """A soft mask computed elsewhere (the motion route's): exactly 1.0 where it is 0 or below the floor."""
    clean, ref, true_flat, mask = random_case(seed)
    rng = np.random.default_rng(seed)
    weight = np.where(rng.random(ref.shape) < 0.3, rng.random(ref.shape), 0.0)
    weight[0, :] = 0.5 * FlatParams().weight_floor  # below the floor: exactly 0
    weight[0, 0] = -1.0  # clipped to 0
    weight[1, 1] = 7.0  # clipped to 1
    res = build_flat(ref, mask, gain=true_flat, weight=weight)
    assert np.all(res.soft_mask[mask] == 1.0)
    zero = (weight < FlatParams().weight_floor) & ~mask
    assert np.all(res.flat[zero] == 1.0) and np.all(res.soft_mask[zero] == 0.0)
    assert res.soft_mask[1, 1] == 1.0 and res.flat[1, 1] == pytest.approx(true_flat[1, 1])
    assert res.stats["soft_mask"] == "given"
    with pytest.raises(ValueError):
        build_flat(ref, mask, gain=true_flat, weight=weight[:5])
    with pytest.raises(ValueError):
        build_flat(ref, mask, gain=true_flat, weight=np.full(ref.shape, np.nan))


def test_empty_mask_gives_unity_flat():
    ref = np.random.default_rng(0).random((20, 20)).astype(np.float32)
    res = build_flat(ref, np.zeros((20, 20), bool), inpainted=ref)
    assert np.all(res.flat == 1.0) and res.stats["fraction_exactly_one"] == 1.0


@pytest.mark.parametrize("writer,ext,scale", [(write_fits, "fits", 1.0), (write_tiff, "tif", 0.5), (write_xisf, "xisf", 0.5)])
def test_read_flat_undoes_recorded_unity(tmp_path, writer, ext, scale):
    flat = np.random.default_rng(1).uniform(0.7, 1.05, (12, 10)).astype(np.float32)
    path = tmp_path / f"flat.{ext}"
    if ext == "tif":
        writer(path, flat * np.float32(scale), description=f"aiflat-local flat; unity = {scale}")
    elif ext == "xisf":
        writer(path, flat * np.float32(scale), properties={"UNITY": scale})
    else:
        writer(path, flat, {"UNITY": 1.0})
    back, unity = read_flat(path)
    assert unity == scale
    np.testing.assert_allclose(back, flat, rtol=1e-7)

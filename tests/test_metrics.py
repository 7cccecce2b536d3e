"""Mask and flat metrics on hand-made masks with known answers, plus invariants."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aiflat_local.errors import InputError
from aiflat_local.metrics import (
    ObjectMatch,
    compare_masks,
    coverage,
    dark_feature_leakage,
    dice,
    disk,
    flat_error,
    format_table,
    object_match,
    pixel_iou,
    recall_by_depth,
    recall_by_depth_detail,
)


def _box(shape, y0, y1, x0, x1, out=None):
    m = np.zeros(shape, bool) if out is None else out
    m[y0:y1, x0:x1] = True
    return m


def test_pixel_metrics_exact_values():
    a = _box((10, 10), 0, 4, 0, 4)          # 16 px
    b = _box((10, 10), 2, 6, 2, 6)          # 16 px, overlap 2x2 = 4
    assert pixel_iou(a, b) == pytest.approx(4 / 28, abs=0)
    assert dice(a, b) == pytest.approx(8 / 32, abs=0)
    assert coverage(a, b) == pytest.approx(4 / 16, abs=0)
    assert coverage(a | b, b) == 1.0


def test_pixel_metrics_empty_conventions():
    e = np.zeros((5, 5), bool)
    f = _box((5, 5), 1, 2, 1, 2)
    assert pixel_iou(e, e) == 1.0 and dice(e, e) == 1.0 and coverage(e, e) == 1.0
    assert pixel_iou(f, e) == 0.0 and dice(f, e) == 0.0
    assert coverage(e, f) == 0.0


def test_pixel_metric_invariants_on_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a = rng.random((32, 40)) < rng.random()
        b = rng.random((32, 40)) < rng.random()
        iou = pixel_iou(a, b)
        assert 0.0 <= iou <= 1.0
        assert iou == pixel_iou(b, a)
        assert dice(a, b) == dice(b, a)
        assert pixel_iou(a, a) == 1.0 and dice(a, a) == 1.0
        # Dice and IoU are linked exactly: D = 2 J / (1 + J).
        assert dice(a, b) == pytest.approx(2 * iou / (1 + iou), abs=1e-12)


def test_shape_mismatch_is_input_error():
    with pytest.raises(InputError, match="shapes differ"):
        pixel_iou(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


def test_object_match_known_answer():
    shape = (40, 40)
    ref = np.zeros(shape, bool)
    _box(shape, 2, 6, 2, 6, ref)        # A: 16 px, predicted exactly
    _box(shape, 20, 24, 20, 24, ref)    # B: 16 px, predicted 2 px away
    _box(shape, 30, 34, 2, 6, ref)      # C: 16 px, missed
    _box(shape, 10, 12, 30, 32, ref)    # tiny (4 px): not counted at min_area 9
    pred = np.zeros(shape, bool)
    _box(shape, 2, 6, 2, 6, pred)       # matches A
    _box(shape, 20, 24, 26, 30, pred)   # gap of 2 columns (24, 25) to B -> distance 3 > 2
    _box(shape, 10, 14, 30, 34, pred)   # overlaps the tiny reference object -> matched
    _box(shape, 30, 34, 30, 34, pred)   # false positive
    om = object_match(pred, ref, min_area=9, tolerance_px=2)
    assert (om.n_ref, om.n_pred) == (3, 4)
    assert om.n_ref_found == 1            # only A: B's predicted neighbour is 3 px away
    assert om.n_pred_matched == 2         # A's twin and the one on the tiny reference
    assert om.recall == pytest.approx(1 / 3, abs=1e-15)
    assert om.precision == pytest.approx(2 / 4, abs=1e-15)
    assert om.f1 == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5), abs=1e-15)
    # With a tolerance of 3 px the shifted box finds B and is matched.
    om3 = object_match(pred, ref, min_area=9, tolerance_px=3)
    assert om3.n_ref_found == 2 and om3.n_pred_matched == 3


def test_object_match_uses_eight_connectivity_and_empty_cases():
    diag = np.eye(12, dtype=bool)           # one 8-connected object of 12 px
    om = object_match(diag, diag, min_area=9, tolerance_px=0)
    assert (om.n_ref, om.n_pred, om.recall, om.precision) == (1, 1, 1.0, 1.0)
    e = np.zeros((12, 12), bool)
    assert object_match(e, e) == ObjectMatch(0, 0, 0, 0, 1.0, 1.0, 1.0)
    miss = object_match(e, diag, min_area=9)
    assert (miss.recall, miss.precision, miss.f1) == (0.0, 1.0, 0.0)


def test_compare_masks_is_json_friendly_and_table_lists_every_key():
    a = _box((20, 20), 2, 8, 2, 8)
    b = _box((20, 20), 3, 9, 3, 9)
    m = compare_masks(a, b)
    text = json.dumps(m)  # no numpy scalars
    assert json.loads(text) == m
    assert m["pixel_iou"] == pytest.approx(25 / 47, abs=1e-15)
    assert m["object_recall"] == 1.0 and m["object_n_ref"] == 1
    table = format_table(m)
    assert len(table.splitlines()) == len(m)
    assert "pixel_iou" in table and "0.5319" in table


def test_disk_structuring_element():
    assert disk(0).sum() == 1
    assert disk(1).sum() == 5
    assert disk(2).sum() == 13


def test_flat_error_known_values():
    true = np.ones((4, 4), np.float32)
    flat = true.copy()
    flat[0, :] = [1.1, 0.9, 1.0, 1.2]
    region = np.zeros((4, 4), bool)
    region[0, :] = True
    e = flat_error(flat, true, region)
    assert e["n_pixels"] == 4
    assert e["max"] == pytest.approx(0.2, abs=1e-6)
    assert e["median"] == pytest.approx(0.1, abs=1e-6)
    assert e["p90"] == pytest.approx(np.percentile([0.1, 0.1, 0.0, 0.2], 90), abs=1e-6)
    empty = flat_error(flat, true, np.zeros((4, 4), bool))
    assert empty == {"median": None, "p90": None, "max": None, "n_pixels": 0}


def test_dark_feature_leakage_counts_only_dust_free_touches():
    shape = (40, 40)
    dark = np.zeros(shape, bool)
    _box(shape, 2, 8, 2, 8, dark)        # spot 1: masked, no dust -> leaked
    _box(shape, 2, 8, 20, 26, dark)      # spot 2: dust covers its left part, mask only there
    _box(shape, 20, 26, 2, 8, dark)      # spot 3: untouched
    _box(shape, 20, 26, 20, 26, dark)    # spot 4: masked beyond its dust -> leaked
    dust = np.zeros(shape, bool)
    _box(shape, 2, 8, 18, 21, dust)
    _box(shape, 20, 22, 20, 22, dust)
    mask = np.zeros(shape, bool)
    _box(shape, 4, 5, 4, 5, mask)
    _box(shape, 2, 8, 18, 21, mask)
    _box(shape, 20, 26, 20, 26, mask)
    assert dark_feature_leakage(mask, dark, dust) == pytest.approx(2 / 4, abs=1e-15)
    assert dark_feature_leakage(np.zeros(shape, bool), dark, dust) == 0.0
    assert dark_feature_leakage(mask, np.zeros(shape, bool), dust) == 0.0


def test_recall_by_depth():
    labels = np.zeros((30, 30), np.int32)
    labels[2:5, 2:5] = 1      # depth 0.05
    labels[10:14, 10:14] = 2  # depth 0.20
    labels[20:25, 20:25] = 3  # depth 0.40
    depth = {1: 0.05, 2: 0.20, 3: 0.40}
    pred = np.zeros((30, 30), bool)
    pred[11, 11] = True
    assert recall_by_depth(pred, labels, depth, 0.10) == 0.5
    assert recall_by_depth(pred, labels, depth, 0.0, max_depth=0.1) == 0.0
    objs = [{"label": k, "depth": v} for k, v in depth.items()]
    assert recall_by_depth(pred, labels, objs, 0.10) == 0.5
    arr = np.array([0.0, 0.05, 0.20, 0.40])
    assert recall_by_depth(pred, labels, arr, 0.10) == 0.5
    assert np.isnan(recall_by_depth(pred, labels, depth, 0.9))
    d = recall_by_depth_detail(pred, labels, depth, 0.1, 0.3)
    assert (d["n"], d["found"], d["recall"]) == (1, 1, 1.0)

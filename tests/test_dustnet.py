"""The dustnet masker: shipped weights, loading code, tiled inference, training entry point."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

from aiflat_local.errors import BackendError, WeightsError  # noqa: E402
from aiflat_local.masks import MASKERS  # noqa: E402


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def shipped():
    """The shipped model, loaded through the weights store (checksums verified)."""
    return MASKERS.create("dustnet")


@pytest.fixture(scope="module")
def held_out_video():
    """A held-out simulated video (seed 7: below the training seeds): ``(frames, median, scene)``."""
    from aiflat_local.synth import SimConfig
    from aiflat_local.train import simulated_video

    config = SimConfig(height=160, width=192, n_frames=9, seed=7, n_dust=10, n_sunspots=1, n_pores=4,
                       central_obstruction=0.3)
    return simulated_video(config)


@pytest.fixture(scope="module")
def held_out_scene(held_out_video):
    """The held-out video's exact temporal median and its scene."""
    return held_out_video[1], held_out_video[2]


def _tiny_model(seed: int = 0, channels: tuple[int, ...] = (4, 6, 8)):
    import torch

    from aiflat_local.masks._dustnet_model import DustNetConfig, build_model

    model = build_model(DustNetConfig(channels=channels), seed=seed)
    with torch.no_grad():  # non-trivial batch-norm statistics, as after training
        g = torch.Generator().manual_seed(seed)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
        model.head.weight.mul_(300.0)  # logits that vary over a few units, like a trained model's
    return model


def _tiny_store(tmp_path, seed: int = 0):
    """A weights store in the real layout: ``manifest.json`` + ``dustnet/{model.safetensors, card.json}``."""
    from aiflat_local.masks._dustnet_model import save_model
    from aiflat_local.weights import sha256_file

    store = tmp_path / "weights"
    model = _tiny_model(seed)
    save_model(model, store / "dustnet", {"threshold": 0.5, "note": "tiny random test model"})
    files = {name: sha256_file(store / "dustnet" / name) for name in ("model.safetensors", "card.json")}
    manifest = {"format": 1, "models": [{"name": "dustnet", "kind": "dustnet", "path": "dustnet",
                                         "files": files, "licence": "MIT", "source": "test",
                                         "fetch": "shipped in the repository"}]}
    (store / "manifest.json").write_text(json.dumps(manifest))
    return store, model


# --------------------------------------------------------------------------- shipped weights
def test_shipped_weights_pinned_in_manifest_and_card():
    from aiflat_local.weights import WeightStore, sha256_file

    store = WeightStore()
    entry = store.entry("dustnet")
    assert entry["kind"] == "dustnet" and entry["licence"] == "MIT"
    path = store.require("dustnet", verify=True)  # raises on a checksum mismatch
    weights = path / "model.safetensors"
    card = json.loads((path / "card.json").read_text())
    assert entry["files"]["model.safetensors"] == sha256_file(weights) == card["files"]["model.safetensors"]["sha256"]
    assert weights.stat().st_size < 5 * 2**20  # "a few MB at most"
    # the card says how it was made and how well it did on held-out seeds
    assert card["command"].startswith("python -m aiflat_local.train")
    for mode in ("reference_only", "with_frames"):
        assert {"iou_deep", "recall_deep", "dark_features_masked"} <= set(card["heldout_metrics"][mode]["pooled"])
    assert card["timing_s"]["total"] < 3600  # trained in under an hour on this 2-core machine
    assert 0.0 < card["threshold"] < 1.0


def _sunspot_mask(scene) -> np.ndarray:
    """The sunspots of a scene (not the pores), from its dark-feature mask and feature list."""
    from scipy import ndimage

    labels, _ = ndimage.label(scene.dark_feature_mask, structure=np.ones((3, 3)))
    ids = {int(labels[int(round(f["y"])), int(round(f["x"]))]) for f in scene.dark_features
           if f["kind"] == "sunspot"}
    return np.isin(labels, sorted(ids - {0}))


def test_shipped_weights_segment_a_simulated_median(shipped, held_out_scene):
    from scipy import ndimage

    from aiflat_local.metrics import recall_by_depth_detail

    reference, scene = held_out_scene
    result = shipped(reference)
    mask = result.binary
    assert result.mask.dtype == np.float32 and set(np.unique(result.mask)) <= {0.0, 1.0}
    depth = {o["label"]: o["depth"] for o in scene.dust_objects}
    deep = recall_by_depth_detail(mask, scene.dust_labels, depth, 0.10)
    assert deep["n"] >= 3
    assert deep["found"] == deep["n"]  # every dust shadow deeper than 10 % is found
    spots = _sunspot_mask(scene)
    assert spots.any() and not (mask & spots).any()  # the sunspot is not dust
    # the mask sits on the dust: most masked pixels are within 2 px of true dust
    # (the rest: pores, which one median image cannot tell from dust; see the next test)
    near = ndimage.binary_dilation(scene.dust_labels > 0, iterations=2)
    assert np.count_nonzero(mask & near) >= 0.8 * np.count_nonzero(mask)
    assert result.params["backend"] == "dustnet" and len(result.params["sha256"]) == 64
    assert len(result.objects) == int(ndimage.label(mask, structure=np.ones((3, 3)))[1])


def test_shipped_weights_with_frames_drop_pores(shipped, held_out_video):
    """With the frames, objects that move with the Sun (pores) are dropped; the dust stays."""
    from aiflat_local.metrics import dark_feature_leakage, recall_by_depth_detail

    frames, reference, scene = held_out_video
    result = shipped(reference, frames=frames)
    mask = result.binary
    motion = result.params["motion"]
    assert motion["used"] and motion["n_frames_read"] == 9 and motion["shift_rms_px"] > 0.7
    depth = {o["label"]: o["depth"] for o in scene.dust_objects}
    deep = recall_by_depth_detail(mask, scene.dust_labels, depth, 0.10)
    assert deep["found"] == deep["n"]
    assert dark_feature_leakage(mask, scene.dark_feature_mask, scene.dust_labels > 0) == 0.0
    assert all(ob["sun_coupling"] <= shipped.max_sun_coupling for ob in result.objects)


def test_shipped_weights_invariant_to_units_and_8bit(shipped, held_out_scene):
    """The input is normalised: a scaled image gives the same mask; an 8-bit copy nearly so."""
    reference, scene = held_out_scene
    a = shipped(reference).binary
    b = shipped(reference * np.float32(1 / 30.0)).binary
    assert np.count_nonzero(a != b) <= 2  # float rounding at the threshold only
    eight = np.clip(np.rint(reference / np.percentile(reference, 99) * 200), 0, 255).astype(np.float32)
    c = shipped(eight).binary
    deep = np.isin(scene.dust_labels, [o["label"] for o in scene.dust_objects if o["depth"] > 0.1])
    # 8-bit quantisation (about 0.5 % steps): the deep dust is still covered
    assert np.count_nonzero(c & deep) >= 0.85 * np.count_nonzero(deep)


def test_shipped_tiled_equals_untiled(shipped, held_out_scene):
    """Tiles of 128 px overlapping by 64 px (2 x 2 tiles here) match one pass over the image.

    The network sees 96 px; with only 64 px of overlap the tiles lack a little
    context, so the logits (which span about -9 to +7 here) move by a few
    tenths at most, and a handful of pixels at the threshold flip. The
    masker's default overlap (96 px) is larger.
    """
    from aiflat_local.masks._dustnet_model import predict_logits, prepare_input

    reference, _ = held_out_scene
    inputs = prepare_input(reference)
    whole = predict_logits(shipped.net, inputs, tile=0)
    tiled = predict_logits(shipped.net, inputs, tile=128, overlap=64)
    assert np.abs(tiled - whole).max() < 0.6
    cut = np.log(shipped.threshold / (1 - shipped.threshold))
    assert np.count_nonzero((whole >= cut) != (tiled >= cut)) <= 1e-3 * whole.size


# --------------------------------------------------------------------------- loading code, tiny models
def test_tiny_model_through_the_weights_store(tmp_path):
    import torch

    from aiflat_local.masks._dustnet_model import prepare_input

    store, model = _tiny_store(tmp_path)
    masker = MASKERS.create("dustnet", weights_dir=str(store))
    rng = np.random.default_rng(0)
    image = (1000 + 20 * rng.standard_normal((48, 64))).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(prepare_input(image))[None])[0, 0].numpy()
    got = masker.logits(image)
    assert np.allclose(got, expected, atol=1e-4)
    result = masker(image)
    assert np.array_equal(result.binary, expected >= 0.0)  # threshold 0.5 <=> logit 0
    assert result.params["sha256"] == json.loads((store / "manifest.json").read_text())[
        "models"][0]["files"]["model.safetensors"]
    # a model directory can be given directly, and a threshold overrides the card's
    direct = MASKERS.create("dustnet", model=str(store / "dustnet"), threshold=0.9)
    assert np.array_equal(direct(image).binary, expected >= math.log(9.0))


def test_tiny_model_corrupted_or_wrong(tmp_path):
    store, _ = _tiny_store(tmp_path)
    weights = store / "dustnet" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupted"):
        MASKERS.create("dustnet", weights_dir=str(store))
    with pytest.raises(WeightsError, match="no such model directory"):
        MASKERS.create("dustnet", model=str(tmp_path / "nowhere" / "dustnet"))
    with pytest.raises(WeightsError, match="unknown model"):
        MASKERS.create("dustnet", model="no-such-model", weights_dir=str(store))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="safetensors"):
        MASKERS.create("dustnet", model=str(tmp_path / "junk"))


def test_options_fail_with_one_line(tmp_path):
    store, _ = _tiny_store(tmp_path)
    with pytest.raises(BackendError, match="float16"):
        MASKERS.create("dustnet", weights_dir=str(store), dtype="float16")
    with pytest.raises(BackendError, match="unknown device"):
        MASKERS.create("dustnet", weights_dir=str(store), device="tpu")
    with pytest.raises(BackendError, match="threshold"):
        MASKERS.create("dustnet", weights_dir=str(store), threshold=1.5)
    info = MASKERS.info("dustnet")
    assert info.requires == ("torch", "safetensors") and info.needs_weights


def test_tiling_constant_field_has_no_seam(tmp_path):
    store, _ = _tiny_store(tmp_path)
    masker = MASKERS.create("dustnet", weights_dir=str(store), tile=48, overlap=16)
    logits = masker.logits(np.full((100, 130), 1234.5, np.float32))
    # a constant image is a constant input; reflect padding keeps every tile constant
    assert np.ptp(logits) < 1e-5


def test_tiling_matches_untiled_tiny_model(rng):
    from scipy import ndimage

    from aiflat_local.masks._dustnet_model import predict_logits, prepare_input, receptive_field_px

    model = _tiny_model(1)
    image = (1000 * (1 + 0.05 * ndimage.gaussian_filter(rng.standard_normal((150, 190)), 3))).astype(np.float32)
    inputs = prepare_input(image)
    whole = predict_logits(model, inputs, tile=0)
    # overlap >= the receptive field: the blended tiles see full context wherever they count
    rf = receptive_field_px(model.config)
    tiled = predict_logits(model, inputs, tile=128, overlap=2 * rf)
    assert np.abs(tiled - whole).max() < 1e-4 * max(np.ptp(whole), 1.0)
    # a small overlap: still no visible seam (differences far below the logits' spread)
    small = predict_logits(model, inputs, tile=64, overlap=32)
    assert np.abs(small - whole).max() < 0.01 * np.ptp(whole)


def test_prepare_input_is_unit_free(rng):
    from aiflat_local.masks._dustnet_model import prepare_input

    image = (500 + 20 * rng.standard_normal((64, 80))).astype(np.float32)
    image[10:14, 20:24] *= 0.8  # a 20 % dip
    a, b = prepare_input(image), prepare_input(image * 64.0)
    assert np.allclose(a, b, atol=1e-5)
    assert a[0, 11, 21] == pytest.approx(-0.2 * 8, abs=0.4)  # relative contrast x 8
    with_nan = image.copy()
    with_nan[0, 0] = np.nan
    assert np.isfinite(prepare_input(with_nan)).all()


# --------------------------------------------------------------------------- training entry point
def test_train_runs_two_steps_on_a_tiny_config(tmp_path):
    from aiflat_local import train

    out = tmp_path / "model"
    assert train.main(["--out", str(out), "--tiny"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["train_config"]["steps"] == 2 and card["seed"] == train.TrainConfig().seed
    masker = MASKERS.create("dustnet", model=str(out))
    assert masker(np.full((40, 40), 7.0, np.float32)).mask.shape == (40, 40)


def test_training_scenes_are_reproducible_and_held_out():
    from aiflat_local import train

    cfg = train.TrainConfig(**{**train.TINY, "scene_px": 48})
    a, b = train.make_training_scene(3, cfg), train.make_training_scene(3, cfg)
    assert np.array_equal(a["sun"], b["sun"]) and np.array_equal(a["bits"], b["bits"])
    sim, _ = train.scene_recipe(3, cfg)
    assert sim.seed >= train.TRAIN_SEED_BASE
    with pytest.raises(ValueError, match="training seed"):
        train.eval_configs([train.TRAIN_SEED_BASE + 1])
    x1, t1, w1 = train.make_batch([a], cfg, step=5, background_px=128.0)
    x2, t2, w2 = train.make_batch([a], cfg, step=5, background_px=128.0)
    assert np.array_equal(x1, x2) and np.array_equal(t1, t2) and x1.shape == (cfg.batch_size, 2, 32, 32)


def test_frames_from_a_ser_reader(shipped, small_video):
    """The pipeline passes a SerReader as the frames: it works like an array of frames."""
    from aiflat_local.io.ser import SerReader

    with SerReader(small_video.video) as reader:
        stack = np.stack([reader.frame(i) for i in range(reader.n_frames)]).astype(np.float32)
        reference = np.median(stack, axis=0)
        from_reader = shipped(reference, frames=reader)
    from_array = shipped(reference, frames=stack)
    assert from_reader.params["motion"]["n_frames_read"] == 9
    assert np.array_equal(from_reader.binary, from_array.binary)


def test_import_does_not_load_torch():
    import subprocess
    import sys

    code = ("import sys, aiflat_local.masks as m; m.MASKERS.info('dustnet'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

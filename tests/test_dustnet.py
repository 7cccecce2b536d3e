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
    # 8-bit quantisation (about 0.5 % steps): the deep dust is still covered, nearly as by the float image
    # (the mask is narrowed to extent_threshold, so neither covers all of the 1 % extent)
    assert np.count_nonzero(c & deep) >= 0.9 * np.count_nonzero(a & deep) >= 0.7 * np.count_nonzero(deep)


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


def _iou_deep(mask, scene):
    from aiflat_local.train import score_mask

    return score_mask(mask, scene)["iou_deep"]


def test_extent_threshold_and_frames_refine_the_extent(shipped, held_out_video):
    """Narrowing to extent_threshold, then measuring the extent from the frames, improves the IoU.

    The same detections (and the same recall) with or without; the numbers
    on the validation seeds are in the masker's documentation.
    """
    from aiflat_local.metrics import recall_by_depth_detail

    frames, reference, scene = held_out_video
    raw = MASKERS.create("dustnet", extent_threshold=None, refine_with_frames=False)
    depth = {o["label"]: o["depth"] for o in scene.dust_objects}
    for with_frames in (False, True):
        f = frames if with_frames else None
        before, after = raw(reference, frames=f), shipped(reference, frames=f)
        assert _iou_deep(after.binary, scene) > _iou_deep(before.binary, scene) + 0.02
        for r in (before, after):
            assert recall_by_depth_detail(r.binary, scene.dust_labels, depth, 0.10)["found"] == sum(
                d > 0.10 for d in depth.values())
        assert after.params["refine"]["used"] is with_frames
        assert after.params["extent_threshold"] == 0.95 and after.params["refine_depth"] == 0.01
    # the frames' extent is closer to the truth than the narrowed detection alone
    alone = shipped(reference)
    assert _iou_deep(shipped(reference, frames=frames).binary, scene) > _iou_deep(alone.binary, scene)


def test_extent_mask_never_drops_an_object():
    from aiflat_local.masks.dustnet import extent_mask

    labels = np.zeros((20, 30), np.int32)
    labels[2:8, 2:8] = 1
    labels[10:16, 20:26] = 2
    logits = np.full(labels.shape, -5.0, np.float32)
    logits[2:8, 2:8] = 1.0
    logits[4:6, 4:6] = 4.0  # object 1: a core above the cut
    logits[10:16, 20:26] = 1.5
    logits[12, 22] = 2.0  # object 2: nothing above the cut; within 1 logit of its peak: all of it
    logits[13, 23] = 0.8  # ... but this pixel (1.2 below the peak)
    out = extent_mask(labels, logits, cut=3.0)
    assert np.array_equal(np.argwhere(out[:9]), np.argwhere(logits[:9] >= 3.0))
    assert out[10:16, 20:26].sum() == 35 and not out[13, 23]
    assert not out[labels == 0].any()


def test_refine_with_motion_measures_the_extent_and_never_drops_an_object(rng):
    """A shadow with a bright rim, a gain known to 0.1 %: the extent is the 1 % footprint, rim included."""
    from types import SimpleNamespace

    from aiflat_local.masks.dustnet import refine_with_motion

    h, w = 64, 64
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - 32, xx - 30)
    flat = np.where(r < 6, 0.7, np.where(r < 8, 1 - 0.3 * (8 - r) / 2, 1.0))
    flat = np.where((r >= 8) & (r < 9.5), 1.02, flat)  # the bright rim
    gain = (flat * (1 + 0.001 * rng.standard_normal((h, w)))).astype(np.float32)
    support = np.ones((h, w), bool)
    truth = np.abs(flat - 1) > 0.01
    detection = (r < 7.5).astype(np.int32)  # the network's detection ...
    core = r < 5.5  # ... and its confident core: smaller than the shadow
    out, info = refine_with_motion(detection, core, SimpleNamespace(gain=gain, support=support), grow_px=6)
    assert np.count_nonzero(out ^ truth) <= 0.05 * truth.sum() and info["pixels_added"] > 0
    assert out[(r >= 8.2) & (r < 9.3)].all()  # the rim is part of the shadow's footprint
    # where the motion says nothing (outside its support) the core is kept as it is
    out, _ = refine_with_motion(detection, core, SimpleNamespace(gain=gain, support=np.zeros((h, w), bool)))
    assert np.array_equal(out, core)
    # no dust under a detection (a gain of 1): the detection is kept, never dropped
    out, _ = refine_with_motion(detection, core, SimpleNamespace(gain=np.ones((h, w), np.float32), support=support))
    assert out[core].all()


def test_sensor_fixed_keeps_what_the_motion_flat_shows_and_nothing_else():
    """An object the shape test would drop is kept when the motion flat shows its shadow; a pore is not."""
    from types import SimpleNamespace

    from aiflat_local.masks.dustnet import sensor_fixed

    labels = np.zeros((40, 60), np.int32)
    labels[5:9, 5:9] = 1  # a tiny deep dust shadow
    labels[20:26, 30:36] = 2  # a pore: the motion flat is 1 under it
    labels[30:34, 50:54] = 3  # a shadow outside the motion support
    gain = np.ones(labels.shape, np.float32)
    gain[5:9, 5:9] = 0.6
    gain[30:34, 50:54] = 0.6
    support = np.ones(labels.shape, bool)
    support[28:, 45:] = False
    motion = SimpleNamespace(gain=gain, support=support, sigma=np.full(labels.shape, 0.002, np.float32))
    assert sensor_fixed(labels, [1, 2, 3], motion) == [1]
    # a deficit within the noise is not evidence
    noisy = SimpleNamespace(gain=gain, support=support, sigma=np.full(labels.shape, 0.2, np.float32))
    assert sensor_fixed(labels, [1, 2, 3], noisy) == []


def test_default_masker_for_images_is_dustnet(tmp_path, cli, small_video):
    """`run` and `mask` on a single image use the shipped dustnet model; videos keep the motion masker."""
    from aiflat_local.io import write_fits
    from aiflat_local.io.ser import SerReader
    from aiflat_local.pipeline import RunOptions

    assert RunOptions().masker == "auto"
    with SerReader(small_video.video) as reader:
        write_fits(tmp_path / "img.fits", reader.frame(0))
    code, _, err = cli("run", tmp_path / "img.fits", "-o", tmp_path / "out", "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["mask"]["backend"] == "dustnet" and report["parameters"]["masker"] == "dustnet"
    assert len(report["mask"]["params"]["sha256"]) == 64
    code, _, err = cli("mask", tmp_path / "img.fits", "-o", tmp_path / "m.png")
    assert code == 0 and "dust pixels" in err


def test_default_masker_with_corrupted_weights_is_one_line(tmp_path, cli, monkeypatch):
    from aiflat_local.io import write_fits

    store, _ = _tiny_store(tmp_path)
    weights = store / "dustnet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")
    monkeypatch.setenv("AIFLAT_WEIGHTS", str(store))
    write_fits(tmp_path / "img.fits", np.full((32, 32), 100.0, np.float32))
    for args in (("run", tmp_path / "img.fits", "-o", tmp_path / "out", "--quiet"),
                 ("mask", tmp_path / "img.fits", "-o", tmp_path / "m.png")):
        code, _, err = cli(*args)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "corrupted" in lines[0] and "model.safetensors" in lines[0], err
    assert not (tmp_path / "m.png").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_user_store_without_dustnet_falls_back_to_the_shipped_model(tmp_path, monkeypatch):
    """$AIFLAT_WEIGHTS (or ./weights) holding only the user's own models must not break the image default."""
    from aiflat_local.weights import SHIPPED_DIRECTORY, sha256_file

    store = tmp_path / "mine"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"format": 1, "models": []}))
    monkeypatch.setenv("AIFLAT_WEIGHTS", str(store))
    masker = MASKERS.create("dustnet")
    assert masker.directory.resolve() == (SHIPPED_DIRECTORY / "dustnet").resolve()
    assert masker.sha256 == sha256_file(SHIPPED_DIRECTORY / "dustnet" / "model.safetensors")
    with pytest.raises(WeightsError, match="unknown model"):  # an explicit store is taken at its word
        MASKERS.create("dustnet", weights_dir=str(store))


def test_a_user_store_that_lists_dustnet_without_its_files_falls_back_too(tmp_path, monkeypatch):
    """A copy of the shipped manifest in a store of the user's own (e.g. for SAM weights) keeps working."""
    import shutil

    from aiflat_local.weights import SHIPPED_DIRECTORY

    store = tmp_path / "mine"
    store.mkdir()
    shutil.copy(SHIPPED_DIRECTORY / "manifest.json", store / "manifest.json")
    monkeypatch.setenv("AIFLAT_WEIGHTS", str(store))
    assert MASKERS.create("dustnet").directory.resolve() == (SHIPPED_DIRECTORY / "dustnet").resolve()


def test_training_into_a_store_folder_repins_its_checksums(tmp_path):
    """`train --out STORE/dustnet` (or --recalibrate) leaves a store that verifies and loads."""
    from aiflat_local.weights import WeightStore, repin, sha256_file

    store, _ = _tiny_store(tmp_path)
    card = store / "dustnet" / "card.json"
    card.write_text(card.read_text().replace("tiny random test model", "recalibrated"))
    with pytest.raises(WeightsError, match="corrupted"):
        WeightStore(store).require("dustnet")
    assert repin(store / "dustnet") == (store / "manifest.json").resolve()
    WeightStore(store).require("dustnet")  # verifies again
    entry = json.loads((store / "manifest.json").read_text())["models"][0]
    assert entry["files"]["card.json"] == sha256_file(card) and entry["licence"] == "MIT"
    assert repin(tmp_path) is None  # not a store's model folder: nothing touched


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
def test_train_runs_two_steps_on_a_tiny_config(tmp_path, cli):
    """`aiflat-local train` is `python -m aiflat_local.train` (same parser, same code)."""
    from aiflat_local import train

    code, out_text, err = cli("train", "--help")
    assert code == 0 and "usage: aiflat-local train" in out_text and "--n-scenes" in out_text, err
    code, _, err = cli("train", "--out", tmp_path / "bad", "--tiny", "--eval-seeds", "100")
    assert code == 2 and "must differ" in err  # held-out = validation seed: one line, nothing trained
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "model"
    code, _, err = cli("train", "--out", out, "--tiny")
    assert code == 0, err
    card = json.loads((out / "card.json").read_text())
    assert card["train_config"]["steps"] == 2 and card["seed"] == train.TrainConfig().seed
    assert card["command"].startswith("aiflat-local train --out")
    masker = MASKERS.create("dustnet", model=str(out))
    assert masker(np.full((40, 40), 7.0, np.float32)).mask.shape == (40, 40)
    assert train.parse_args(["--out", "x", "--tiny", "--channels", "4", "8"])[0].channels == (4, 8)


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

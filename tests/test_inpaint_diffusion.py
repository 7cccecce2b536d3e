"""Diffusion inpainter: exact crops, compositing and brightness mapping; seeds, ensembles,
re-rolls; the flat stays exactly 1.0 outside the soft mask whatever the model does; real
loading of tiny random SD / SDXL inpainting pipelines through the weights store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from aiflat_local.errors import BackendError, InputError, WeightsError
from aiflat_local.flat import build_flat, inpaint_region, soft_mask
from aiflat_local.inpaint import INPAINTERS
from aiflat_local.inpaint._diffusion_crops import (BrightnessMap, Window, block_any, block_mean, derive_seed,
                                                   ensemble_fill, extract, grid_mask, gray_to_model_rgb,
                                                   model_rgb_to_gray, plan_windows, robust_spread)

# Third-party deprecation notices that are not ours to fix, by name (none fire with diffusers
# 0.42 / transformers 5; other versions announce API changes this way).
THIRD_PARTY = [
    "ignore::FutureWarning:diffusers.*",
    "ignore::DeprecationWarning:diffusers.*",
    "ignore::DeprecationWarning:transformers.*",
    "ignore::DeprecationWarning:huggingface_hub.*",
]


def third_party_warnings(fn):
    for w in THIRD_PARTY:
        fn = pytest.mark.filterwarnings(w)(fn)
    return fn


# --------------------------------------------------------------------------- helpers
def disks(shape, centres, radius):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    m = np.zeros(shape, bool)
    for cy, cx in centres:
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    return m


def solar_scene(shape=(128, 160), seed=0):
    """A smooth bright disk-like gradient with granulation, 16-bit-like levels, and three dust shadows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    clean = 30000 + 40 * xx - 25 * yy + 600 * rng.standard_normal(shape)
    dust = disks(shape, [(30, 40), (90, 110), (64, 150)], 5)
    attenuation = np.where(dust, 0.6, 1.0)
    return (clean * attenuation).astype(np.float32), dust


class FakePipe:
    """Stands in for a diffusers inpainting pipeline: same call, any output we like.

    ``fn(image (B,H,W,3) in [0, 1], mask (B,H,W,1), generators) -> (B,H,W,3)``.
    """

    vae_scale_factor = 8

    def __init__(self, fn):
        self.fn = fn
        self.batches: list[int] = []
        self.kwargs: list[dict] = []

    def __call__(self, *, prompt, negative_prompt, image, mask_image, height, width, strength, num_inference_steps,
                 guidance_scale, generator, output_type):
        assert image.shape == (len(prompt), height, width, 3) and image.dtype == np.float32
        assert mask_image.shape == (len(prompt), height, width, 1)
        assert len(generator) == len(prompt) == len(negative_prompt) and output_type == "np"
        self.batches.append(len(prompt))
        self.kwargs.append(dict(prompt=prompt[0], negative_prompt=negative_prompt[0], steps=num_inference_steps,
                                guidance_scale=guidance_scale))
        return SimpleNamespace(images=np.asarray(self.fn(image, mask_image, generator), dtype=np.float32))


def bad_model(image, mask, generators):
    """Changes every pixel and the brightness: inverted, brightened, noisy, hot-pixel spikes."""
    rng = np.random.default_rng(7)
    out = 0.9 - 0.7 * image + 0.05 * rng.standard_normal(image.shape)
    out[:, ::7, ::5, :] = 1.0
    return np.clip(out, 0.0, 1.0)


def seeded_model(image, mask, generators):
    """Output depends on the seed only: a per-sample level plus seeded noise."""
    import torch

    out = []
    for g in generators:
        level = torch.rand(1, generator=g).item()
        noise = torch.rand(image.shape[1:3], generator=g).numpy()
        out.append(np.repeat((0.3 + 0.4 * level + 0.05 * noise)[..., None], 3, axis=-1))
    return np.stack(out)


def identity_model(image, mask, generators):
    return image.copy()


def make(pipeline_fn, **kw):
    kw.setdefault("crop_size", 64)
    kw.setdefault("context_px", 8)
    kw.setdefault("steps", 2)
    return INPAINTERS.create("diffusion", pipeline=FakePipe(pipeline_fn), **kw)


# --------------------------------------------------------------------------- brightness mapping
def test_brightness_mapping_round_trip_is_exact():
    # Every 16-bit level, with a context range like a solar disk.
    levels = np.arange(65536, dtype=np.float32)
    bmap = BrightnessMap.from_context(np.array([1000.0, 50000.0]))
    assert np.array_equal(bmap.inverse(bmap.forward(levels)), levels)
    # Float data of any sign and scale, zero included.
    rng = np.random.default_rng(0)
    for lo, hi in ((0.2, 0.9), (-3.0, 5.0), (1e-4, 3e-4), (2.0e6, 2.1e6)):
        v = rng.uniform(lo - (hi - lo), hi + (hi - lo), 100_000).astype(np.float32)
        v[:3] = (0.0, lo, hi)
        m = BrightnessMap.from_context(v[(v >= lo) & (v <= hi)])
        assert np.array_equal(m.inverse(m.forward(v)), v), (lo, hi)
        # The context lands inside [-0.8, 0.8] and fills at least half of it.
        x = m.forward(v[(v >= lo) & (v <= hi)])
        assert np.abs(x).max() <= 0.8 and np.abs(x).max() > 0.4
        assert np.log2(m.scale) == np.round(np.log2(m.scale))  # a power of two
    # Gray -> model RGB in [0, 1] -> gray is exact on float32 values.
    g = rng.uniform(-1, 1, (4, 8, 8)).astype(np.float32)
    rgb = gray_to_model_rgb(g)
    assert rgb.shape == (4, 8, 8, 3) and rgb.dtype == np.float32 and rgb.min() >= 0 and rgb.max() <= 1
    back = model_rgb_to_gray(rgb)
    assert np.array_equal((back + 1) / 2, rgb[..., 0].astype(np.float64))


def test_constant_or_empty_context_gives_a_usable_map():
    for values in (np.full(10, 1234.0), np.zeros(10), np.array([])):
        m = BrightnessMap.from_context(values)
        assert m.scale > 0 and np.isfinite(m.offset)
        v = np.asarray(values, np.float32)
        assert np.array_equal(m.inverse(m.forward(v)), v)


# --------------------------------------------------------------------------- windows
def test_windows_cover_every_region_with_its_context_and_multiple_of_8():
    rng = np.random.default_rng(1)
    shape = (300, 420)
    m = np.zeros(shape, bool)
    for _ in range(40):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        m[y:y + rng.integers(1, 9), x:x + rng.integers(1, 9)] = True
    plan = plan_windows(m, crop_size=128, context_px=12)
    assert plan.model_shape == (128, 128)
    assert sorted(plan.region_window) == list(range(1, plan.n_regions + 1))
    assert sorted(r for w in plan.windows for r in w.regions) == list(range(1, plan.n_regions + 1))
    assert np.array_equal(plan.labels > 0, m)
    for rid, wi in plan.region_window.items():
        win, sl = plan.windows[wi], plan.boxes[rid - 1]
        assert win.height % 8 == 0 and win.width % 8 == 0
        assert 0 <= win.y and win.y + win.height <= shape[0] and 0 <= win.x and win.x + win.width <= shape[1]
        # Whole region plus context (clipped at the image border) inside its window.
        assert win.y <= max(sl[0].start - 12, 0) and min(sl[0].stop + 12, shape[0]) <= win.y + win.height
        assert win.x <= max(sl[1].start - 12, 0) and min(sl[1].stop + 12, shape[1]) <= win.x + win.width


def test_hundreds_of_small_spots_on_a_full_hd_frame_take_a_few_batched_calls():
    rng = np.random.default_rng(2)
    shape = (1200, 1920)
    dust = np.zeros(shape, bool)
    for _ in range(300):
        y, x = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
        dust[y - 3:y + 4, x - 3:x + 4] = True
    region = inpaint_region(dust)
    plan = plan_windows(region, crop_size=512, context_px=64)
    assert plan.n_regions > 150
    # 1200 x 1920 holds 8.8 windows of 512^2; greedy cover measured at 18-19.
    assert len(plan.windows) <= 24
    assert -(-len(plan.windows) // 8) <= 3  # batched calls at batch size 8


def test_region_larger_than_a_window_is_seen_downscaled():
    m = disks((256, 256), [(128, 128)], 60)
    plan = plan_windows(m, crop_size=64, context_px=8)
    (win,) = plan.windows
    assert win.factor == 3 and (win.height, win.width) == (192, 192)
    assert block_mean(np.ones((192, 192)), 3).shape == (64, 64)
    small = np.zeros((6, 6), bool)
    small[4, 1] = True
    assert np.array_equal(np.argwhere(block_any(small, 3)), [[1, 0]])


def test_window_larger_than_the_image_is_mirror_padded():
    img = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    m = np.zeros(img.shape, bool)
    m[20, 25] = True
    plan = plan_windows(m, crop_size=64, context_px=8)
    assert plan.model_shape == (40, 56)  # rounded up to multiples of 8, never past crop_size
    (win,) = plan.windows
    crop = extract(img, win)
    assert crop.shape == (40, 56) and (win.y, win.x) == (0, -3)
    assert np.array_equal(crop[:, 3:53], img)
    assert np.array_equal(crop[:, 2], img[:, 0]) and np.array_equal(crop[:, 53], img[:, 49])
    inside = Window(5, 7, 16, 16, 1, key=1)
    assert np.array_equal(extract(img, inside), img[5:21, 7:23])


def test_grid_mask_grows_a_pixel_to_its_latent_cell():
    m = np.zeros((16, 24), bool)
    m[9, 17] = True
    g = grid_mask(m, 8)
    assert g.sum() == 64 and g[8:16, 16:24].all()


def test_ensemble_median_and_robust_spread():
    s = np.stack([np.full((2, 2), v, np.float32) for v in (1.0, 2.0, 4.0, 10.0, 3.0)])
    fill, spread = ensemble_fill(s)
    assert np.all(fill == 3.0)
    assert np.allclose(spread, 1.4826 * 1.0)  # |s - 3| = 2, 1, 1, 7, 0 -> median 1
    assert np.array_equal(robust_spread(s[:1]), np.zeros((2, 2), np.float32))
    one, none = ensemble_fill(s[:1])
    assert none is None and np.array_equal(one, s[0])


def test_seeds_are_deterministic_and_distinct():
    seeds = {derive_seed(0, key, roll, k) for key in range(1, 6) for roll in (0, 1, 2) for k in range(4)}
    assert len(seeds) == 60 and all(0 <= s < 2 ** 32 for s in seeds)
    assert derive_seed(5, 3, 1, 2) == derive_seed(5, 3, 1, 2) != derive_seed(6, 3, 1, 2)


# --------------------------------------------------------------------------- compositing and the flat
@third_party_warnings
def test_bad_model_cannot_touch_anything_outside_the_mask_and_the_flat_stays_exactly_one():
    ref, dust = solar_scene()
    region = inpaint_region(dust)
    pipe = FakePipe(bad_model)
    res = INPAINTERS.create("diffusion", pipeline=pipe, crop_size=64, context_px=8, steps=2)(ref, region)
    assert res.image.dtype == np.float32 and res.image.shape == ref.shape
    # Compositing: unmasked pixels bit-identical; masked pixels come from the model (which may,
    # rarely, hit a reference value to the last bit: 1 pixel in 4948 here).
    assert np.array_equal(res.image[~region], ref[~region])
    assert np.mean(res.image[region] == ref[region]) < 1e-3
    assert res.params["n_windows_downscaled"] >= 1  # regions of ~55 px > 64 - 2 * 8 of context
    soft = soft_mask(dust)
    flat = build_flat(ref, dust, inpainted=res.image)
    assert np.all(flat.flat[soft == 0] == 1.0)
    # Even the model's raw output, wrong everywhere and rescaled, cannot move the flat outside.
    raw = (ref[::-1, ::-1] * 0.37 + 5000).astype(np.float32)
    raw[::9, ::4] = np.nan
    for inpainted in (raw, np.full_like(ref, -1.0), res.image * 3 + 100):
        out = build_flat(ref, dust, inpainted=inpainted)
        assert np.all(out.flat[soft == 0] == 1.0)
        assert np.isfinite(out.flat).all()


@third_party_warnings
def test_identity_model_round_trips_the_window_and_fills_with_the_mapping_offset():
    ref, dust = solar_scene()
    ref16 = np.round(ref).astype(np.uint16)  # 16-bit input
    region = inpaint_region(dust)
    res = make(identity_model)(ref16, region)
    assert np.array_equal(res.image[~region], ref16[~region].astype(np.float32))
    # Masked pixels reach the model as 0 (mid-grey) and come back as the window's offset, exactly
    # (in full-resolution windows; downscaled ones interpolate).
    assert any(win["factor"] == 1 for win in res.params["windows"])
    for win in (w for w in res.params["windows"] if w["factor"] == 1):
        for rid in win["regions"]:
            pix = next(r for r in res.params["regions"] if r["id"] == rid)
            y0, x0, y1, x1 = pix["bbox"]
            sel = region[y0:y1, x0:x1]
            assert np.all(res.image[y0:y1, x0:x1][sel] == np.float32(win["offset"]))
    # And the clean part of a window survives gray -> RGB -> model -> gray -> brightness exactly
    # up to the float32 precision of the model's [0, 1] images (2**-24 of the window's range).
    from aiflat_local.inpaint import _diffusion_model as dm
    from aiflat_local.inpaint._diffusion_crops import output_to_image, prepare_window

    model = dm.LoadedModel.wrap(FakePipe(identity_model), "cpu", "float32")
    win = Window(10, 20, 64, 64, 1, key=1)
    prep = prepare_window(ref, region, win, 8, BrightnessMap(0.0, 1.0))
    gray = model.run(prep.gray[None], prep.mask[None], [1], prompt="p", negative_prompt="n", steps=1,
                     guidance_scale=1.0)
    back = output_to_image(gray[0], win, prep.mapping)
    crop, clean = extract(ref, win), ~prep.mask
    assert np.max(np.abs(back[clean] - crop[clean])) <= 2.0 ** -23 / prep.mapping.scale


@third_party_warnings
def test_nan_from_the_model_is_one_clear_error():
    ref, dust = solar_scene()
    with pytest.raises(BackendError, match="no finite pixel.*float32"):
        make(lambda im, m, g: np.full(im.shape, np.nan, np.float32))(ref, dust)


# --------------------------------------------------------------------------- seeds, ensemble, re-roll
@third_party_warnings
def test_seeds_recorded_runs_repeat_and_reroll_changes_only_the_chosen_region():
    ref, dust = solar_scene()
    a = make(seeded_model, batch_size=1)(ref, dust)
    b = make(seeded_model, batch_size=3)(ref, dust)
    assert np.array_equal(a.image, b.image)  # same seeds, any batching
    assert a.params["n_regions"] == 3 and a.params["seed"] == 0
    regions = {r["id"]: r for r in a.params["regions"]}
    assert all(len(r["seeds"]) == 1 and r["roll"] == 0 for r in regions.values())
    c = make(seeded_model, reroll=[2])(ref, dust)
    rerolled = c.params["regions"][1]
    assert rerolled["id"] == 2 and rerolled["roll"] == 1 and rerolled["seeds"] != regions[2]["seeds"]
    lab = a.params["regions"]
    for r in lab:
        y0, x0, y1, x1 = r["bbox"]
        same = np.array_equal(a.image[y0:y1, x0:x1], c.image[y0:y1, x0:x1])
        assert same == (r["id"] != 2)
    d = make(seeded_model, reroll="all", roll=2)(ref, dust)
    assert all(r["roll"] == 2 for r in d.params["regions"])
    assert not np.array_equal(d.image[dust], a.image[dust])
    e = make(seeded_model, seed=1)(ref, dust)
    assert not np.array_equal(e.image[dust], a.image[dust])
    with pytest.raises(InputError, match="no region 9; this mask has regions 1 to 3"):
        make(seeded_model, reroll=[9])(ref, dust)


@third_party_warnings
def test_ensemble_fill_is_the_median_and_spread_the_robust_std():
    ref, dust = solar_scene()
    pipe = FakePipe(seeded_model)
    res = INPAINTERS.create("diffusion", pipeline=pipe, crop_size=64, context_px=8, ensemble=5, batch_size=4,
                            prompt="clean sun", negative_prompt="dust")(ref, dust)
    n_windows = res.params["n_windows"]
    assert n_windows == 2 and res.params["n_samples"] == 5 * n_windows and pipe.batches == [4, 4, 2]
    assert pipe.kwargs[0]["prompt"] == "clean sun" and pipe.kwargs[0]["negative_prompt"] == "dust"
    assert res.spread.shape == ref.shape and res.spread.dtype == np.float32
    assert np.all(res.spread[~dust] == 0) and np.all(res.spread[dust] > 0)
    for r in res.params["regions"]:
        assert len(set(r["seeds"])) == 5 and r["rel_spread_median"] > 0
    # Recompute one pixel from the five seeds by hand.
    import torch

    win = res.params["windows"][0]
    rid = win["regions"][0]
    seeds = next(r for r in res.params["regions"] if r["id"] == rid)["seeds"]
    y0, x0, y1, x1 = next(r for r in res.params["regions"] if r["id"] == rid)["bbox"]
    py, px = np.argwhere(dust[y0:y1, x0:x1])[0] + (y0, x0)
    bmap = BrightnessMap(win["offset"], win["scale"])
    vals = []
    for s in seeds:
        g = torch.Generator("cpu").manual_seed(s)
        level = torch.rand(1, generator=g).item()
        noise = torch.rand((64, 64), generator=g).numpy()[py - win["y"], px - win["x"]]
        y = np.float32(0.3 + 0.4 * level + 0.05 * noise)
        vals.append(bmap.inverse(model_rgb_to_gray(np.array([y, y, y]))))
    assert res.image[py, px] == np.median(np.array(vals, np.float32))
    assert np.isclose(res.spread[py, px], robust_spread(np.array(vals)[:, None])[0], rtol=1e-6)


# --------------------------------------------------------------------------- errors and options
def test_registered_with_requirements_and_import_stays_light():
    info = INPAINTERS.info("diffusion")
    assert info.requires == ("torch", "diffusers", "transformers") and info.needs_weights
    code = ("import sys, aiflat_local.inpaint.diffusion, aiflat_local.inpaint._diffusion_crops;"
            "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_empty_mask_returns_the_input_without_loading_anything():
    img = np.arange(64, dtype=np.uint16).reshape(8, 8)
    res = INPAINTERS.create("diffusion", model="no-such-model")(img, np.zeros((8, 8), bool))
    assert np.array_equal(res.image, img.astype(np.float32)) and res.spread is None


@pytest.mark.parametrize("kw, message", [
    (dict(dtype="float16"), "float16 needs a CUDA device.*float32"),
    (dict(ensemble=0), "ensemble must be >= 1"),
    (dict(crop_size=100), "multiple of 8"),
    (dict(device="tpu"), "unknown device"),
    (dict(reroll="three"), "reroll must be 'all' or region ids"),
    (dict(dtype="int8"), "unknown dtype"),
])
def test_bad_options_are_one_line_errors(kw, message):
    with pytest.raises(BackendError, match=message):
        INPAINTERS.create("diffusion", **kw)


def test_cuda_request_without_a_gpu_names_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    inp = INPAINTERS.create("diffusion", device="cuda", model="x")
    with pytest.raises(BackendError, match="no CUDA device.*--device cpu"):
        inp(np.ones((16, 16), np.float32), np.eye(16, dtype=bool))


def test_out_of_memory_is_one_line_naming_what_would_fit():
    import torch

    from aiflat_local.inpaint._diffusion_model import memory_advice

    def oom(image, mask, generators):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    ref, dust = solar_scene()
    with pytest.raises(BackendError, match=r"does not fit in the memory of cpu .*batch of 3 .*--inpaint-batch-size 1"):
        make(oom, batch_size=3, ensemble=3)(ref, dust)
    assert memory_advice("cuda", "float32", 8) == "--inpaint-batch-size 4 or --dtype float16 or --device cpu"
    assert memory_advice("cuda:1", "float16", 1) == "--device cpu"


def test_missing_or_wrong_weights_say_what_to_do(tmp_path):
    from aiflat_local.inpaint._diffusion_model import pipeline_class_name, resolve_model

    (tmp_path / "manifest.json").write_text(json.dumps({"models": [{
        "name": "sd-x", "kind": "diffusers-inpaint", "path": "sd-x", "files": {"model_index.json": None},
        "licence": "x", "source": "x", "fetch": "hf download org/sd-x --local-dir sd-x"}]}))
    with pytest.raises(WeightsError, match="missing file .*model_index.json.*hf download org/sd-x"):
        resolve_model("sd-x", tmp_path)
    with pytest.raises(WeightsError, match="no such model folder"):
        resolve_model(str(tmp_path / "nowhere" / "model"), tmp_path)
    folder = tmp_path / "plain"
    folder.mkdir()
    with pytest.raises(WeightsError, match="not a diffusers model folder"):
        pipeline_class_name(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(WeightsError, match="not an inpainting model"):
        pipeline_class_name(folder)


def test_shipped_manifest_lists_the_diffusion_models():
    from pathlib import Path

    from aiflat_local.weights import WeightStore

    store = WeightStore(Path(__file__).resolve().parent.parent / "weights")
    for name in ("sd-inpainting", "sdxl-inpainting"):
        entry = store.entry(name)
        assert entry["kind"] == "diffusers-inpaint" and entry["fetch"].startswith("hf download ")
        assert "model_index.json" in entry["files"]


# --------------------------------------------------------------------------- real diffusers, tiny models
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run 5-20x faster on one thread than on two oversubscribed cores (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A weights store holding tiny random SD and SDXL inpainting folders (built once)."""
    from aiflat_local.inpaint._diffusion_tiny import make_tiny_inpaint_pipeline

    store = tmp_path_factory.mktemp("store")
    for kind in ("sd", "sdxl"):
        make_tiny_inpaint_pipeline(store / f"tiny-{kind}", kind=kind)
    (store / "manifest.json").write_text(json.dumps({"models": [
        {"name": f"tiny-{kind}", "kind": "diffusers-inpaint", "path": f"tiny-{kind}",
         "files": {"model_index.json": None, "unet/config.json": None}, "licence": "test", "source": "test",
         "fetch": "built by the test"} for kind in ("sd", "sdxl")]}))
    return store


@third_party_warnings
@pytest.mark.parametrize("kind, cls", [("sd", "StableDiffusionInpaintPipeline"),
                                       ("sdxl", "StableDiffusionXLInpaintPipeline")])
def test_tiny_pipeline_loads_from_the_store_and_inpaints(tiny_store, kind, cls):
    from aiflat_local.weights import sha256_file

    ref, dust = solar_scene()
    inp = INPAINTERS.create("diffusion", model=f"tiny-{kind}", weights_dir=str(tiny_store), steps=2, ensemble=2,
                            batch_size=2, context_px=8)
    res = inp(ref, dust)
    p = res.params
    assert p["pipeline_class"] == cls and p["crop_size"] == 64 and p["model_shape"] == [64, 64]
    assert p["n_regions"] == 3 and p["n_samples"] == 2 * p["n_windows"]
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert p["weights_sha256"][unet] == sha256_file(tiny_store / f"tiny-{kind}" / unet)
    assert np.array_equal(res.image[~dust], ref[~dust])
    assert np.isfinite(res.image).all() and res.spread.shape == ref.shape
    json.dumps(p)  # provenance is JSON-friendly
    # Same seeds, same numbers (CPU); loading by folder path works the same.
    again = INPAINTERS.create("diffusion", model=str(tiny_store / f"tiny-{kind}"), steps=2, ensemble=2,
                              batch_size=2, context_px=8)(ref, dust)
    assert np.array_equal(again.image, res.image)
    assert np.all(build_flat(ref, dust, inpainted=res.image).flat[soft_mask(dust) == 0] == 1.0)


@third_party_warnings
def test_corrupted_weight_file_is_one_clear_error(tiny_store, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_store / "tiny-sd", broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    inp = INPAINTERS.create("diffusion", model=str(broken), steps=1)
    with pytest.raises(WeightsError, match="could not load the diffusion model.*fetch it again"):
        inp.load()


@pytest.mark.gpu
@third_party_warnings
def test_tiny_pipeline_on_cuda_in_half_precision(tiny_store):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ref, dust = solar_scene()
    res = INPAINTERS.create("diffusion", model=str(tiny_store / "tiny-sd"), device="cuda", steps=2,
                            ensemble=2, context_px=8)(ref, dust)
    assert res.params["dtype"] == "float16" and res.params["device"] == "cuda"
    assert np.array_equal(res.image[~dust], ref[~dust]) and np.isfinite(res.image).all()
    # The initial noise comes from CPU generators: the fill is close to the CPU float32 one.
    cpu = INPAINTERS.create("diffusion", model=str(tiny_store / "tiny-sd"), steps=2, ensemble=2,
                            context_px=8)(ref, dust)
    span = float(ref.max() - ref.min())
    assert np.median(np.abs(res.image[dust] - cpu.image[dust])) < 0.05 * span

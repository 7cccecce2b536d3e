"""Train the built-in ``dustnet`` dust segmenter from the physical simulator alone.

::

    python -m aiflat_local.train --out weights/dustnet            # the shipped model (37 min, 2 threads)
    python -m aiflat_local.train --out weights/dustnet --recalibrate   # threshold + held-out scores again
    python -m aiflat_local.train --out /tmp/tiny --tiny           # seconds: proves the code runs
    aiflat-local train --out weights/dustnet                      # the same command, same options

No real image is ever used: every training image comes from
:mod:`aiflat_local.synth` with simulator seeds ``>= TRAIN_SEED_BASE``; the
held-out evaluation uses seeds below it (0, 1, 2, ... by default).

The data recipe
---------------
1. **Scenes** (:func:`scene_recipe`, :func:`make_training_scene`): ``n_scenes``
   simulated fields of ``scene_px`` square with randomly drawn f-ratio
   (10-60, log-uniform) and pixel size (2.4-6 um), which together scale every
   dust distance class (footprints of ~3 to ~40 px per mm from the sensor);
   refractors and obstructed telescopes (donuts); 4-20 dust particles per
   256 x 256 px, 40 % of the medium-distance ones with a deep core
   (:func:`add_cores`); 0-2 sunspots and 0-12 pores (the hard negatives: dark and
   compact, but moving with the Sun, so blurred by the drift, the jitter and
   the seeing, and without the bright diffraction rim); drift 2-12 px, seeing
   jitter 1-3.5 px and blur 0.7-2.2 px; the limb and the sky in a quarter of
   the scenes; H-alpha, white-light and Ca-K textures.
2. **The reference image**: the temporal median of ``5-15`` noiseless frames
   (:func:`~aiflat_local.synth.clean_sun`: each frame shifted and blurred by the
   seeing), multiplied by the true flat. Because the flat is fixed to the
   sensor and positive, ``median_i(sun_i * flat) = flat * median_i(sun_i)``
   exactly; only the noise is approximated: it is added after the median,
   with a level drawn over a wide range (below), which covers what the median
   of a real video leaves (between ``sigma * 1.25 / sqrt(n)`` where the frames
   agree and about ``sigma`` where texture moves through a pixel). This costs
   one FFT per frame instead of a full noisy render, and lets the solar part
   be varied independently of the dust (next step).
3. **Augmentation**, drawn anew at every step (:func:`augment_scene`): solar
   texture contrast x0.3-1.6; extra seeing blur of the Sun only (0.5-3 px:
   the dust is on the sensor and stays sharp); large smooth bright and dark
   regions (25-120 px, 3-15 %); brightness gradients (+-15 % linear, +-10 %
   quadratic); softer dust shadows (the attenuation blurred by 0.4-1.2 px,
   the target recomputed from it) and a slightly soft image (0.3-0.8 px);
   shot-like or flat Gaussian noise of 0.02-1 % of the disk level
   (sometimes spatially correlated); in 45 % of the cases 8-bit quantisation
   at a disk level of 45-220 DN, three quarters of them JPEG-compressed
   (quality 40-95, Pillow); flips and 90-degree rotations of the crops.
4. **Targets** (:func:`object_classes`): a pixel is dust where the flat
   differs from 1 by more than 1 % (the simulator's ``dust_labels`` rule,
   rims included) near a dust object at least ``min_target_depth`` (10 %)
   deep, the depth the issue's targets are defined at. Objects of depth
   ``ignore_depth`` (3 %) to 10 % are *ignored* (no loss within 3 px of
   them): they are real dust but often invisible in one median image, and a
   model pushed to find them learns to fire on solar texture. Fainter ones
   are background.

Training: a compact U-Net (:mod:`aiflat_local.masks._dustnet_model`), batches
of ``crops_per_scene`` crops from each of ``batch_size / crops_per_scene``
scenes (centred on target dust with probability 0.45, on a sunspot or pore
with probability 0.2, on dark solar texture away from dust with probability
0.15), loss = masked binary cross-entropy + 0.5 x soft Dice, AdamW with a
linear warm-up and cosine decay of the learning rate.

After training (:func:`finish`) the probability threshold is chosen on
validation seeds (:data:`VALIDATION_SEEDS`: the highest threshold whose
deep-dust recall is still >= 0.98), then the held-out seeds are scored
(:func:`evaluate_on_simulator`: full noisy videos rendered with
:func:`~aiflat_local.synth.render_frame`, their exact median as the
reference), from the reference alone and with the frames (the masker's
motion check). Everything lands in ``card.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

#: Training scenes use simulator seeds ``TRAIN_SEED_BASE + index``; held-out seeds must be below.
TRAIN_SEED_BASE = 1_000_000
#: Object depth above which the issue's targets count dust as "deep".
DEEP = 0.10
#: Simulator seeds used to choose the probability threshold (not training, not held-out).
VALIDATION_SEEDS = (100, 101, 102, 103, 104, 105)
_EIGHT = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the model card).

    Attributes
    ----------
    seed : int
        Seeds the scene recipes, the augmentation, the crops and the network's
        initialisation.
    n_scenes, scene_px : int
        Number and size (square, px) of simulated training scenes.
    crop_px, crops_per_scene, batch_size : int
        Training crops; a batch holds ``batch_size`` crops from
        ``batch_size // crops_per_scene`` scenes.
    steps : int
        Optimiser steps.
    lr, weight_decay : float
        AdamW peak learning rate (warm-up, cosine decay) and weight decay.
    channels : tuple of int
        U-Net channels per level (see :class:`~aiflat_local.masks._dustnet_model.DustNetConfig`).
    min_target_depth, ignore_depth : float
        Dust objects at least *min_target_depth* deep are targets; objects
        of depth in ``[ignore_depth, min_target_depth)`` are ignored by the
        loss (neither dust nor background); shallower ones are background.
    core_fraction : float
        Share of medium-distance shadows given a deep core (:func:`add_cores`).
    threads : int
        torch and worker threads.
    eval_seeds : tuple of int
        Held-out simulator seeds (each < ``TRAIN_SEED_BASE``).
    validation_seeds : tuple of int
        Simulator seeds the probability threshold is chosen on (not training,
        not held-out).
    eval_size : tuple of int
        ``(H, W)`` of the held-out videos.
    eval_frames : int
        Frames per held-out video (their median is the reference).
    checkpoint_every : int
        When > 0, the model so far is written to ``OUT/checkpoint/`` every
        this many steps (for watching a long run; the final model is the last step's).
    """

    seed: int = 20240621
    n_scenes: int = 1000
    scene_px: int = 256
    crop_px: int = 96
    crops_per_scene: int = 4
    batch_size: int = 24
    steps: int = 3600
    lr: float = 3e-3
    weight_decay: float = 1e-4
    channels: tuple[int, ...] = (12, 20, 32, 48)
    min_target_depth: float = 0.10
    ignore_depth: float = 0.03
    core_fraction: float = 0.4
    threads: int = 2
    eval_seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    validation_seeds: tuple[int, ...] = VALIDATION_SEEDS
    eval_size: tuple[int, int] = (480, 640)
    eval_frames: int = 24
    checkpoint_every: int = 0

    def validate(self) -> None:
        if any(s >= TRAIN_SEED_BASE or s < 0 for s in self.eval_seeds + self.validation_seeds):
            raise ValueError(f"held-out and validation seeds must be in [0, {TRAIN_SEED_BASE})")
        if set(self.eval_seeds) & set(self.validation_seeds):
            raise ValueError("held-out and validation seeds must differ")
        if self.crop_px > self.scene_px or self.crop_px % 2 ** (len(self.channels) - 1):
            raise ValueError("crop_px must be <= scene_px and a multiple of 2**(depth-1)")
        if self.batch_size % self.crops_per_scene:
            raise ValueError("batch_size must be a multiple of crops_per_scene")


TINY = dict(n_scenes=4, scene_px=64, crop_px=32, crops_per_scene=2, batch_size=4, steps=2,
            channels=(4, 6), eval_seeds=(0,), validation_seeds=(100,), eval_size=(64, 96), eval_frames=3, threads=1)


# --------------------------------------------------------------------------- scenes
def scene_recipe(index: int, cfg: TrainConfig):
    """The simulator configuration and median length of training scene *index* (deterministic).

    Returns ``(SimConfig, n_median_frames)``.
    """
    from .synth import SimConfig

    rng = np.random.default_rng([cfg.seed, 1, index])
    texture = str(rng.choice(["halpha", "white_light", "cak"], p=[0.45, 0.25, 0.30]))
    area = (cfg.scene_px / 256.0) ** 2
    sim = SimConfig(
        height=cfg.scene_px, width=cfg.scene_px, seed=TRAIN_SEED_BASE + index,
        n_frames=int(rng.integers(5, 16)),
        f_ratio=float(math.exp(rng.uniform(math.log(10.0), math.log(60.0)))),
        pixel_size_um=float(rng.uniform(2.4, 6.0)),
        central_obstruction=0.0 if rng.random() < 0.45 else float(rng.uniform(0.15, 0.5)),
        n_dust=max(1, int(round(rng.integers(4, 21) * area))),
        n_sunspots=int(rng.integers(0, 3)),
        n_pores=int(round(rng.integers(0, 13) * area)),
        drift_px=float(rng.uniform(2.0, 12.0)),
        jitter_px=float(rng.uniform(1.0, 3.5)),
        seeing_blur_px=float(rng.uniform(0.7, 2.2)),
        limb=bool(rng.random() < 0.25),
        texture=texture,
    )
    return sim, sim.n_frames


def make_training_scene(index: int, cfg: TrainConfig) -> dict[str, Any]:
    """Simulate training scene *index*: the noiseless median Sun, the true flat and the target classes.

    Returns a dict with ``sun`` (float16, the median of the noiseless frames
    divided by the disk level, so the disk is ~1), ``flat`` (float16, 1.0 = no
    attenuation), ``bits`` (uint8, see :func:`object_classes`; 4 = sunspot or
    pore) and ``targets``/``negatives``/``hard`` (``(y, x)`` centres of target
    dust objects, of dark features, and of dark solar texture away from dust,
    for crop sampling).
    """
    from .synth import clean_sun, make_scene

    sim, n_median = scene_recipe(index, cfg)
    scene = make_scene(sim)
    sun = np.median(np.stack([clean_sun(scene, i) for i in range(n_median)]), axis=0)
    sun /= np.float32(sim.signal_adu)
    flat, labels, objects = add_cores(scene, cfg.core_fraction, np.random.default_rng([cfg.seed, 4, index]))
    bits = object_classes(labels, objects, cfg.min_target_depth, cfg.ignore_depth)
    bits |= scene.dark_feature_mask.astype(np.uint8) << 2
    centres = [(o["y"], o["x"]) for o in objects if o["depth"] >= cfg.min_target_depth]
    negatives = [(f["y"], f["x"]) for f in scene.dark_features]
    # hard negatives: dark solar texture (filament channels, dark lanes) well away from dust
    local = sun / np.maximum(ndimage.gaussian_filter(sun, 12.0), 1e-6) - 1.0
    dark = (local < -0.06) & (sun > 0.3 * float(np.percentile(sun, 99)))
    dark &= ~ndimage.binary_dilation(labels > 0, iterations=4)
    ys, xs = np.nonzero(dark)
    rng = np.random.default_rng([cfg.seed, 3, index])
    pick = rng.choice(ys.size, size=min(ys.size, 48), replace=False) if ys.size else np.zeros(0, int)
    return {"sun": sun.astype(np.float16), "flat": flat.astype(np.float16), "bits": bits,
            "targets": np.array(centres, np.float32).reshape(-1, 2),
            "negatives": np.array(negatives, np.float32).reshape(-1, 2),
            "hard": np.stack([ys[pick], xs[pick]], axis=1).astype(np.float32).reshape(-1, 2)}


def add_cores(scene: Any, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Give some wide, faint shadows a small deep core: ``(flat, labels, objects)`` (copies).

    Real dust often shows a dark core of a few pixels inside a wider, fainter
    disk with a bright rim (dust on two surfaces, or a dense particle with a
    fluffy halo): without such examples a model takes it for a sunspot
    (umbra and penumbra). For each medium-distance object (3-10 % deep), with
    probability *fraction*, a near-class particle rendered by the simulator
    (same optics) is multiplied into the flat at its centre; the object's
    label grows to where either changes the flat by more than 1 %, and its
    depth becomes that of the combination.
    """
    from .synth import _render_dust

    flat = scene.true_flat.astype(np.float32).copy()
    labels = scene.dust_labels.copy()
    objects = [dict(o) for o in scene.dust_objects]
    h, w = flat.shape
    for o in objects:
        if o["kind"] != "medium" or rng.random() >= fraction:
            continue
        d = _render_dust(scene.config, "near", rng)
        gain, half = d["gain"].astype(np.float32), d["half"]
        yc, xc = int(round(o["y"])), int(round(o["x"]))
        y0, x0 = yc - half, xc - half
        sy = slice(max(y0, 0), min(y0 + gain.shape[0], h))
        sx = slice(max(x0, 0), min(x0 + gain.shape[1], w))
        if sy.start >= sy.stop or sx.start >= sx.stop:
            continue
        g = gain[sy.start - y0:sy.stop - y0, sx.start - x0:sx.stop - x0]
        flat[sy, sx] *= g
        grow = (np.abs(g - 1.0) > 0.01) & (labels[sy, sx] == 0)
        labels[sy, sx][grow] = o["label"]
        own = labels == o["label"]
        o["depth"] = float(1.0 - flat[own].min()) if own.any() else o["depth"]
        o["core"] = True
    return flat, labels, objects


def object_classes(labels: np.ndarray, objects: Sequence[dict], min_depth: float,
                   ignore_depth: float, grow_px: int = 3) -> np.ndarray:
    """Where the training target comes from, per pixel: uint8 bit 1 = near a target object, 2 = ignored.

    Bit 1: within *grow_px* of a dust object at least *min_depth* deep (the
    target there is ``|1 - flat| > 1 %``, computed from the flat after any
    augmentation of it). Bit 2 (where bit 1 is not set): within *grow_px* of
    an object of depth in ``[ignore_depth, min_depth)``: no loss there.
    Shallower objects are background.
    """
    n = int(labels.max()) if labels.size else 0
    deep = np.zeros(n + 1, bool)
    mid = np.zeros(n + 1, bool)
    for o in objects:
        if o["label"] <= n:
            if o["depth"] >= min_depth:
                deep[o["label"]] = True
            elif o["depth"] >= ignore_depth:
                mid[o["label"]] = True
    near_deep = deep[labels]
    near_mid = mid[labels]
    if near_deep.any():
        near_deep = ndimage.binary_dilation(near_deep, iterations=grow_px)
    if near_mid.any():
        near_mid = ndimage.binary_dilation(near_mid, iterations=grow_px) & ~near_deep
    return near_deep.astype(np.uint8) | (near_mid.astype(np.uint8) << 1)


def targets_from_truth(labels: np.ndarray, objects: Sequence[dict], flat: np.ndarray, min_depth: float,
                       ignore_depth: float) -> tuple[np.ndarray, np.ndarray]:
    """Training target and ignore masks: ``target = |1 - flat| > 1 %`` near target objects."""
    bits = object_classes(labels, objects, min_depth, ignore_depth)
    return target_from_flat(flat, bits), (bits & 2) > 0


def target_from_flat(flat: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The dust target: where the flat differs from 1 by more than 1 %, near a target object."""
    return (np.abs(1.0 - flat.astype(np.float32)) > 0.01) & ((bits & 1) > 0)


def build_bank(cfg: TrainConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """All training scenes, simulated on ``cfg.threads`` processes (results in index order)."""
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    bank: list[dict[str, Any]] = []
    workers = max(1, int(cfg.threads))
    if workers == 1 or cfg.n_scenes < 8:
        for i in range(cfg.n_scenes):
            bank.append(make_training_scene(i, cfg))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"),
                                 initializer=_worker_init) as pool:
            for i, scene in enumerate(pool.map(make_training_scene, range(cfg.n_scenes),
                                               [cfg] * cfg.n_scenes, chunksize=8)):
                bank.append(scene)
                if (i + 1) % 100 == 0:
                    log(f"  simulated {i + 1}/{cfg.n_scenes} scenes ({time.perf_counter() - t0:.0f} s)")
    return bank


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------- augmentation
def jpeg_round_trip(img8: np.ndarray, quality: int) -> np.ndarray:
    """An 8-bit image saved as a JPEG of *quality* (Pillow) and decoded again, as float32."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img8).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im, dtype=np.float32)


def augment_scene(scene: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One randomly degraded reference image of a training scene, and its dust target.

    See the module notes for the steps. Returns ``(image, target, recipe)``:
    float32 ``(H, W)`` in arbitrary units, the boolean target (``|1 - flat| >
    1 %`` near target objects, from the flat as augmented) and the drawn
    parameters.
    """
    sun = scene["sun"].astype(np.float32)
    flat = scene["flat"].astype(np.float32)
    h, w = sun.shape
    recipe: dict[str, Any] = {}
    has_sky = float(sun.min()) < 0.3 * float(np.percentile(sun, 99))
    if rng.random() < 0.6 and not has_sky:  # texture contrast
        alpha = float(math.exp(rng.uniform(math.log(0.3), math.log(1.6))))
        smooth = ndimage.gaussian_filter(sun, 8.0, mode="reflect")
        sun = smooth + alpha * (sun - smooth)
        recipe["contrast"] = alpha
    if rng.random() < 0.5:  # more seeing blur: the Sun only, the dust is on the sensor
        s = float(rng.uniform(0.5, 3.0))
        sun = ndimage.gaussian_filter(sun, s, mode="reflect")
        recipe["blur"] = s
    if rng.random() < 0.6:  # large, smooth bright and dark regions (plage, filaments, haze)
        scale = float(math.exp(rng.uniform(math.log(25.0), math.log(120.0))))
        field = ndimage.gaussian_filter(rng.standard_normal((h, w), dtype=np.float32), scale, mode="wrap")
        field -= field.mean()
        field = np.clip(field / max(float(field.std()), 1e-12), -3.0, 3.0)
        amp = float(rng.uniform(0.03, 0.15))
        sun = sun * np.exp(amp * field)
        recipe["regions"] = (round(scale, 1), round(amp, 3))
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    a, b = rng.uniform(-0.15, 0.15, 2)
    c = rng.uniform(-0.10, 0.10)
    sun = sun * np.maximum(1.0 + a * yy + b * xx + c * (xx * xx + yy * yy), 0.05)
    if rng.random() < 0.4:  # softer shadows (diffraction, pixel crosstalk): blur the attenuation
        s = float(rng.uniform(0.4, 1.2))
        flat = 1.0 - ndimage.gaussian_filter(1.0 - flat, s, mode="nearest")
        recipe["dust_blur"] = s
    target = target_from_flat(flat, scene["bits"])
    img = sun * flat
    if rng.random() < 0.25:  # optics / resampling: everything slightly soft
        s = float(rng.uniform(0.3, 0.8))
        img = ndimage.gaussian_filter(img, s, mode="reflect")
        recipe["image_blur"] = s
    sigma = float(math.exp(rng.uniform(math.log(2e-4), math.log(1e-2))))
    z = rng.standard_normal((h, w), dtype=np.float32)
    if rng.random() < 0.3:  # spatially correlated (demosaicing, resampling)
        z = ndimage.gaussian_filter(z, float(rng.uniform(0.5, 1.0)))
        z /= max(float(z.std()), 1e-6)
    shot = rng.random() < 0.7
    img = img + sigma * (np.sqrt(np.maximum(img, 0.0)) if shot else 1.0) * z
    recipe.update(noise=sigma, shot=shot)
    if rng.random() < 0.45:  # 8-bit, mostly JPEG: how reference images are often shared
        level = float(rng.uniform(45, 220))
        img8 = np.clip(np.rint(img * level), 0, 255).astype(np.uint8)
        if rng.random() < 0.75:
            q = int(rng.integers(40, 96))
            img = jpeg_round_trip(img8, q)
            recipe["jpeg"] = q
        else:
            img = img8.astype(np.float32)
        recipe["level8"] = level
    else:
        img = img * np.float32(math.exp(rng.uniform(math.log(100.0), math.log(60000.0))))
    return img.astype(np.float32), target, recipe


def _pick_centre(scene: dict[str, Any], rng: np.random.Generator, crop: int) -> tuple[int, int]:
    h, w = scene["bits"].shape
    u = rng.random()
    pool = (scene["targets"] if u < 0.45 else scene["negatives"] if u < 0.65
            else scene["hard"] if u < 0.8 else None)
    if pool is not None and len(pool):
        y, x = pool[int(rng.integers(len(pool)))]
        y += rng.uniform(-crop / 3, crop / 3)
        x += rng.uniform(-crop / 3, crop / 3)
    else:
        y, x = rng.uniform(0, h), rng.uniform(0, w)
    y0 = int(np.clip(round(y - crop / 2), 0, h - crop))
    x0 = int(np.clip(round(x - crop / 2), 0, w - crop))
    return y0, x0


def make_batch(bank: list[dict[str, Any]], cfg: TrainConfig, step: int,
               background_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch *step*: inputs ``(B, 2, c, c)``, targets and loss weights ``(B, 1, c, c)`` (deterministic)."""
    from .masks._dustnet_model import prepare_input

    rng = np.random.default_rng([cfg.seed, 2, step])
    n_scenes = cfg.batch_size // cfg.crops_per_scene
    c = cfg.crop_px
    xs, ts, ws = [], [], []
    for _ in range(n_scenes):
        scene = bank[int(rng.integers(len(bank)))]
        img, target, _ = augment_scene(scene, rng)
        inp = prepare_input(img, background_px)
        for _ in range(cfg.crops_per_scene):
            y0, x0 = _pick_centre(scene, rng, c)
            x = inp[:, y0:y0 + c, x0:x0 + c]
            t = target[y0:y0 + c, x0:x0 + c].astype(np.float32)
            wgt = ((scene["bits"][y0:y0 + c, x0:x0 + c] & 2) == 0).astype(np.float32)
            k = int(rng.integers(4))
            flip = rng.random() < 0.5
            x, t, wgt = (np.rot90(a, k, axes=(-2, -1)) for a in (x, t, wgt))
            if flip:
                x, t, wgt = (a[..., ::-1] for a in (x, t, wgt))
            xs.append(np.ascontiguousarray(x))
            ts.append(np.ascontiguousarray(t)[None])
            ws.append(np.ascontiguousarray(wgt)[None])
    return np.stack(xs), np.stack(ts), np.stack(ws)


# --------------------------------------------------------------------------- held-out evaluation
_EVAL_VARIANTS: tuple[dict[str, Any], ...] = (
    {},
    {"central_obstruction": 0.3},
    {"texture": "white_light"},
    {"texture": "cak"},
    {"limb": True},
    {"f_ratio": 45.0, "central_obstruction": 0.35, "texture": "halpha"},
)


def eval_configs(seeds: Sequence[int], size: tuple[int, int] = (480, 640), n_frames: int = 24):
    """Held-out simulator videos: default settings with one variant per seed (cycling).

    Variants: plain H-alpha at f/30; donuts (obstruction 0.3); white light;
    Ca-K; the limb in the field; f/45 with donuts.
    """
    from .synth import SimConfig

    out = []
    for k, seed in enumerate(seeds):
        if seed >= TRAIN_SEED_BASE:
            raise ValueError(f"seed {seed} is a training seed (held-out seeds are < {TRAIN_SEED_BASE})")
        out.append(SimConfig(height=size[0], width=size[1], n_frames=n_frames, seed=int(seed),
                             **_EVAL_VARIANTS[k % len(_EVAL_VARIANTS)]))
    return out


def simulated_video(config) -> tuple[np.ndarray, np.ndarray, Any]:
    """A held-out video: ``(frames, median, scene)``, the noisy uint16 frames and their exact median."""
    from .synth import make_scene, render_frame

    scene = make_scene(config)
    frames = np.stack([render_frame(scene, i) for i in range(config.n_frames)])
    return frames, np.median(frames, axis=0).astype(np.float32), scene


def simulated_reference(config) -> tuple[np.ndarray, Any]:
    """A held-out video's reference: the exact median of its noisy uint16 frames. Returns ``(median, scene)``."""
    _, median, scene = simulated_video(config)
    return median, scene


def score_mask(mask: np.ndarray, scene: Any, min_depth: float = DEEP) -> dict[str, Any]:
    """Counts that pool over scenes: deep-dust IoU, object recall, dark features masked.

    ``iou_deep``: pixel IoU of *mask* with the pixels of dust objects deeper
    than *min_depth* (their full extent: where the flat differs from 1 by more
    than 1 %), leaving out the pixels of shallower dust objects (a mask there
    is neither rewarded nor punished). ``recall_deep``: deep objects with a
    mask pixel within 2 px. ``dark_masked``: sunspots and pores (not under
    dust) touched by the mask (:func:`~aiflat_local.metrics.dark_feature_leakage`).
    ``false_objects``: mask objects (>= 9 px) farther than 2 px from any dust.
    """
    from .metrics import dark_feature_leakage, object_match, pixel_iou, recall_by_depth_detail

    labels = scene.dust_labels
    depth = {int(o["label"]): float(o["depth"]) for o in scene.dust_objects}
    deep_ids = [k for k, d in depth.items() if d > min_depth]
    deep = np.isin(labels, deep_ids)
    shallow = (labels > 0) & ~deep
    m = np.asarray(mask, bool)
    inter = int(np.count_nonzero(m & deep))
    union = int(np.count_nonzero((m | deep) & ~shallow))
    rec = recall_by_depth_detail(m, labels, depth, min_depth)
    rec_med = recall_by_depth_detail(m, labels, depth, 0.03, min_depth)
    dark = scene.dark_feature_mask
    free = dark & ~ndimage.binary_dilation(labels > 0, iterations=2)
    dl, n_dark = ndimage.label(dark, structure=_EIGHT)
    counted = len(set(np.unique(dl[free]).tolist()) - {0})
    leak = dark_feature_leakage(m, dark, labels > 0)
    om = object_match(m, labels > 0, min_area=9, tolerance_px=2)
    return {"inter_deep": inter, "union_deep": union, "iou_deep": 1.0 if union == 0 else inter / union,
            "n_deep": rec["n"], "found_deep": rec["found"],
            "n_medium": rec_med["n"], "found_medium": rec_med["found"],
            "n_dark": counted, "dark_masked": int(round(leak * counted)),
            "iou_all_dust": pixel_iou(m, labels > 0),
            "pred_objects": om.n_pred, "false_objects": om.n_pred - om.n_pred_matched}


def pool_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool per-scene counts: IoU = sum of intersections / sum of unions, recalls over all objects."""
    s = {k: sum(r[k] for r in rows) for k in ("inter_deep", "union_deep", "n_deep", "found_deep",
                                               "n_medium", "found_medium", "n_dark", "dark_masked",
                                               "pred_objects", "false_objects")}
    return {
        "iou_deep": s["inter_deep"] / max(s["union_deep"], 1),
        "recall_deep": s["found_deep"] / max(s["n_deep"], 1),
        "dark_features_masked": s["dark_masked"] / max(s["n_dark"], 1),
        "recall_medium_3_10pct": s["found_medium"] / max(s["n_medium"], 1),
        "min_scene_iou_deep": float(min(r["iou_deep"] for r in rows)),
        "mean_iou_all_dust": float(np.mean([r["iou_all_dust"] for r in rows])),
        **{k: s[k] for k in ("n_deep", "found_deep", "n_medium", "found_medium", "n_dark", "dark_masked",
                             "pred_objects", "false_objects")},
    }


def evaluate_on_simulator(predict: Callable[..., np.ndarray], configs: Sequence[Any],
                          log: Callable[[str], None] = lambda s: None, *,
                          with_frames: bool = False) -> dict[str, Any]:
    """Score a mask function on held-out simulated videos.

    ``predict(reference)`` (or ``predict(reference, frames)`` with
    *with_frames*: the video's frames as an ``(n, H, W)`` uint16 array) returns
    a boolean mask. Returns ``{"pooled": ..., "scenes": [...]}`` (see
    :func:`score_mask`, :func:`pool_scores`).
    """
    rows = []
    for config in configs:
        frames, ref, scene = simulated_video(config)
        t = time.perf_counter()
        mask = predict(ref, frames) if with_frames else predict(ref)
        elapsed = time.perf_counter() - t
        row = {"seed": config.seed, "texture": config.texture, "obstruction": config.central_obstruction,
               "limb": config.limb, "f_ratio": config.f_ratio, **score_mask(mask, scene),
               "seconds": round(elapsed, 3)}
        rows.append(row)
        log(f"  seed {config.seed:3d} {config.texture:11s} obstr {config.central_obstruction:.2f} "
            f"limb {int(config.limb)}: IoU deep {row['iou_deep']:.3f}  deep {row['found_deep']}/{row['n_deep']}  "
            f"dark masked {row['dark_masked']}/{row['n_dark']}  false objects {row['false_objects']}")
    return {"pooled": pool_scores(rows), "scenes": rows}


def calibrate_threshold(logits_fn: Callable[[np.ndarray], np.ndarray], configs: Sequence[Any],
                        grid: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9), min_recall: float = 0.98,
                        log: Callable[[str], None] = lambda s: None) -> tuple[float, list[dict[str, Any]]]:
    """The highest probability threshold in *grid* whose deep-dust recall on *configs* is >= *min_recall*.

    Run on validation seeds (:data:`VALIDATION_SEEDS`), never on the held-out
    ones. Returns ``(threshold, table)``; 0.5 when no threshold reaches the recall.
    """
    refs = [simulated_reference(c) for c in configs]
    logits = [logits_fn(ref) for ref, _ in refs]
    table, best = [], None
    for thr in grid:
        cut = math.log(thr / (1.0 - thr))
        p = pool_scores([score_mask(lg >= cut, scene) for lg, (_, scene) in zip(logits, refs)])
        row = {"threshold": thr, **{k: round(p[k], 4) for k in ("iou_deep", "recall_deep", "dark_features_masked")}}
        table.append(row)
        log(f"  threshold {thr:.2f}: IoU deep {row['iou_deep']:.3f}, recall deep {row['recall_deep']:.3f}, "
            f"dark features masked {row['dark_features_masked']:.3f}")
        if p["recall_deep"] >= min_recall:
            best = thr
    return (best if best is not None else 0.5), table


# --------------------------------------------------------------------------- training
def _loss(logits, target, weight):
    import torch
    from torch.nn import functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * weight).sum() / weight.sum().clamp_min(1.0)
    p = torch.sigmoid(logits) * weight
    t = target * weight
    dice = 1.0 - (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
    return bce + 0.5 * dice, bce, dice


def lr_factor(step: int, total: int, warmup: float = 0.05) -> float:
    """Learning-rate multiplier: linear warm-up over *warmup* of the run, then cosine decay to 2 %."""
    n_warm = max(1, int(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    t = (step - n_warm) / max(1, total - n_warm)
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def train(cfg: TrainConfig, out: str | os.PathLike, *, command: str = "",
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a dustnet model and write ``model.safetensors`` + ``card.json`` into *out*.

    Runs with ``cfg.threads`` torch threads and deterministic algorithms
    (both restored afterwards). Returns the card (also written to ``card.json``).
    """
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, int(cfg.threads)))
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, out, command, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, out: str | os.PathLike, command: str, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from .masks._dustnet_model import DustNetConfig, build_model, n_parameters, receptive_field_px, save_model

    cfg.validate()
    t_start = time.perf_counter()
    net_cfg = DustNetConfig(channels=cfg.channels)
    model = build_model(net_cfg, seed=cfg.seed)
    log(f"dustnet: {n_parameters(model)} parameters, receptive field {receptive_field_px(net_cfg)} px")

    log(f"simulating {cfg.n_scenes} training scenes of {cfg.scene_px} px ...")
    t0 = time.perf_counter()
    bank = build_bank(cfg, log)
    t_sim = time.perf_counter() - t0
    log(f"  done in {t_sim:.0f} s")

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, cfg.steps))
    model.train()
    t0 = time.perf_counter()
    history = []
    running = None
    with ThreadPoolExecutor(1) as prefetch:  # the next batch is prepared while this one trains
        pending = prefetch.submit(make_batch, bank, cfg, 0, net_cfg.background_px)
        for step in range(cfg.steps):
            x, t, wgt = pending.result()
            if step + 1 < cfg.steps:
                pending = prefetch.submit(make_batch, bank, cfg, step + 1, net_cfg.background_px)
            logits = model(torch.from_numpy(x))
            loss, bce, dice = _loss(logits, torch.from_numpy(t), torch.from_numpy(wgt))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            values = np.array([loss.item(), bce.item(), dice.item()])
            running = values if running is None else 0.98 * running + 0.02 * values
            if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
                elapsed = time.perf_counter() - t0
                history.append({"step": step + 1, "loss": round(float(running[0]), 5),
                                "bce": round(float(running[1]), 5), "dice": round(float(running[2]), 5),
                                "seconds": round(elapsed, 1)})
                log(f"  step {step + 1}/{cfg.steps}  loss {running[0]:.4f} (bce {running[1]:.4f}, "
                    f"dice {running[2]:.4f})  {elapsed:.0f} s")
            if cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_model(model, Path(out) / "checkpoint", {"step": step + 1, "seed": cfg.seed})
    t_train = time.perf_counter() - t0
    model.eval()
    del bank
    card = {
        "name": "dustnet",
        "description": "Compact U-Net dust segmenter for solar reference images, trained on the "
                       "aiflat-local simulator only (no real image was used for training).",
        "licence": "MIT",
        "command": command,
        "seed": cfg.seed,
        "train_config": _jsonable(asdict(cfg)),
        "input": {"channels": ["relative contrast image/background - 1, clipped +-0.6, x8",
                               "log(background / disk level), clipped to [-5, 0.5]"],
                  "background": f"median over ~{net_cfg.background_px:g} px at reduced resolution",
                  "reference": "temporal median of the video (or any single image), linear units"},
        "output": "one logit per pixel; dust where sigmoid(logit) >= threshold",
        "data_recipe": _data_recipe(cfg),
        "loss": "masked BCE + 0.5 soft Dice; AdamW, 5 % linear warm-up then cosine decay",
        "history": history,
        "timing_s": {"simulate": round(t_sim, 1), "train": round(t_train, 1)},
        "threads": cfg.threads,
        "versions": _versions(),
    }
    card = finish(model, cfg, out, card, log=log)
    card["timing_s"]["total"] = round(time.perf_counter() - t_start, 1)
    card = save_model(model, out, card)
    if (Path(out) / "checkpoint").is_dir():  # superseded by the final model
        import shutil

        shutil.rmtree(Path(out) / "checkpoint")
    log(f"wrote {Path(out) / 'model.safetensors'} (sha256 {card['files']['model.safetensors']['sha256'][:16]}...) "
        f"in {card['timing_s']['total']:.0f} s")
    return card


def finish(model: Any, cfg: TrainConfig, out: str | os.PathLike, card: dict[str, Any], *,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Choose the threshold on the validation seeds, then score the held-out seeds; returns the card updated.

    The held-out seeds are scored through the masker a user gets
    (:class:`~aiflat_local.masks.dustnet.DustNetMasker` with its default
    settings: extent narrowing, and with the frames the motion check and the
    extent from the motion flat), from the reference alone and with the
    video's frames, and the network alone at the threshold for comparison.
    """
    import tempfile

    from .masks._dustnet_model import predict_logits, prepare_input, save_model
    from .masks.dustnet import DustNetMasker

    model.eval()
    background_px = model.config.background_px

    def logits_fn(ref: np.ndarray) -> np.ndarray:
        return predict_logits(model, prepare_input(ref, background_px), tile=512, overlap=96)

    t0 = time.perf_counter()
    val_configs = eval_configs(cfg.validation_seeds, cfg.eval_size, cfg.eval_frames)
    log(f"threshold on validation seeds {list(cfg.validation_seeds)} (highest with deep-dust recall >= 0.98):")
    threshold, table = calibrate_threshold(logits_fn, val_configs, log=log)
    cut = math.log(threshold / (1.0 - threshold))
    log(f"  -> threshold {threshold}")
    t_cal = time.perf_counter() - t0

    def raw(ref: np.ndarray) -> np.ndarray:
        return logits_fn(ref) >= cut

    t0 = time.perf_counter()
    held_out = eval_configs(cfg.eval_seeds, cfg.eval_size, cfg.eval_frames)
    with tempfile.TemporaryDirectory(prefix="dustnet-finish-") as tmp:
        save_model(model, tmp, {"threshold": threshold})
        masker = DustNetMasker(model=tmp)  # what a user gets: the shipped masker's default settings
        metrics: dict[str, Any] = {"masker_settings": {k: v for k, v in masker.params().items()
                                                       if k not in ("architecture", "sha256", "model", "path")}}
        runs = (("reference_only", lambda r: masker(r).binary, False),
                ("with_frames", lambda r, f: masker(r, frames=f).binary, True),
                ("network_alone", raw, False))
        for key, predict, with_frames in runs:
            log(f"held-out seeds {list(cfg.eval_seeds)}, {key.replace('_', ' ')}:")
            metrics[key] = evaluate_on_simulator(predict, held_out, log, with_frames=with_frames)
            p = metrics[key]["pooled"]
            log(f"  pooled: IoU deep {p['iou_deep']:.3f}, recall deep {p['recall_deep']:.3f}, "
                f"dark features masked {p['dark_features_masked']:.3f}")
    card = dict(card)
    card["threshold"] = threshold
    card["threshold_calibration"] = {"seeds": list(cfg.validation_seeds), "rule": "highest threshold with deep-dust "
                                     "recall >= 0.98 on the validation seeds", "table": table}
    card["heldout_metrics"] = {
        "definition": score_mask.__doc__.strip().splitlines()[0] + " (see aiflat_local.train.score_mask)",
        "configs": [_jsonable(asdict(c)) for c in held_out], **metrics}
    card.setdefault("timing_s", {}).update(calibrate=round(t_cal, 1), evaluate=round(time.perf_counter() - t0, 1))
    return card


def recalibrate(out: str | os.PathLike, cfg: TrainConfig, *, command: str = "",
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-run :func:`finish` on a trained model in *out* (weights unchanged; the card is rewritten)."""
    import torch

    from .errors import WeightsError
    from .masks._dustnet_model import CARD_FILE, WEIGHTS_FILE, load_model, write_card
    from .weights import sha256_file

    torch.set_num_threads(max(1, int(cfg.threads)))
    model = load_model(out)
    card = json.loads((Path(out) / CARD_FILE).read_text())
    if sha256_file(Path(out) / WEIGHTS_FILE) != card["files"][WEIGHTS_FILE]["sha256"]:
        raise WeightsError(f"{Path(out) / WEIGHTS_FILE} is not the file {Path(out) / CARD_FILE} describes")
    card = finish(model, cfg, out, card, log=log)
    card["calibration_command"] = command
    return write_card(out, card)  # the weights file is left as it is


def _data_recipe(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "simulator": "aiflat_local.synth (SIM_VERSION %d)" % _sim_version(),
        "training_seeds": f"{TRAIN_SEED_BASE} .. {TRAIN_SEED_BASE + cfg.n_scenes - 1}",
        "scenes": f"{cfg.n_scenes} of {cfg.scene_px} x {cfg.scene_px} px",
        "texture": "halpha 45 %, white_light 25 %, cak 30 %",
        "f_ratio": "10-60 log-uniform", "pixel_size_um": "2.4-6.0",
        "central_obstruction": "0 (45 %) or 0.15-0.5 (donuts)",
        "n_dust": "4-20 per 256^2", "n_sunspots": "0-2", "n_pores": "0-12 per 256^2 (hard negatives)",
        "motion": "drift 2-12 px, jitter 1-3.5 px, seeing blur 0.7-2.2 px", "limb": "25 % of scenes",
        "reference": "median of 5-15 noiseless frames x true flat, noise added after (see train.py)",
        "augmentation": ["texture contrast x0.3-1.6 (60 %, not with sky)", "extra Sun blur 0.5-3 px (50 %)",
                         "large smooth regions 25-120 px, 3-15 % (60 %)",
                         "gradients +-15 % linear, +-10 % quadratic",
                         "dust attenuation blurred 0.4-1.2 px (40 %), target recomputed",
                         "whole image blurred 0.3-0.8 px (25 %)",
                         "noise 0.02-1 % of the disk level, shot-like (70 %) or flat, correlated (30 %)",
                         "8-bit at disk level 45-220 DN (45 %), JPEG quality 40-95 (75 % of those)",
                         "flips and 90-degree rotations"],
        "targets": f"|1 - flat| > 1 % near dust objects >= {cfg.min_target_depth:.0%} deep; objects "
                   f"{cfg.ignore_depth:.0%}-{cfg.min_target_depth:.0%} deep (+3 px) ignored; shallower: background",
        "cores": f"{cfg.core_fraction:.0%} of medium-distance shadows get a near-class particle at their centre",
        "crops": f"{cfg.crop_px} px, 45 % on target dust, 20 % on sunspots/pores, 15 % on dark solar "
                 "texture (filaments, lanes) away from dust, 20 % anywhere",
    }


def _sim_version() -> int:
    from .synth import SIM_VERSION

    return SIM_VERSION


def _versions() -> dict[str, str]:
    import scipy
    import torch

    from . import __version__

    out = {"aiflat_local": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "scipy": scipy.__version__, "torch": torch.__version__}
    try:
        import PIL
        import safetensors

        out.update(pillow=PIL.__version__, safetensors=safetensors.__version__)
    except ImportError:  # pragma: no cover
        pass
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


# --------------------------------------------------------------------------- command line
PROG = "python -m aiflat_local.train"


def parse_args(argv: Sequence[str] | None = None, prog: str = PROG) -> tuple[TrainConfig, Path, bool]:
    """Command-line options -> ``(config, output directory, recalibrate?)``.

    Every :class:`TrainConfig` field is an option (``--n-scenes``,
    ``--channels 12 20 32 48``, ...); ``--tiny`` starts from :data:`TINY`.
    Shared by ``python -m aiflat_local.train`` and ``aiflat-local train``.
    """
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output directory (model.safetensors, card.json)")
    p.add_argument("--tiny", action="store_true", help="a tiny configuration that runs in seconds (tests)")
    p.add_argument("--recalibrate", action="store_true",
                   help="do not train: choose the threshold and score the held-out seeds again for the model in --out")
    for f in TrainConfig.__dataclass_fields__.values():
        name = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, tuple):
            p.add_argument(name, type=type(default[0]), nargs="+", default=None, help=f"default {default}")
        else:
            p.add_argument(name, type=type(default), default=None, help=f"default {default}")
    args = p.parse_args(argv)
    cfg = replace(defaults, **TINY) if args.tiny else defaults
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()
             if k in TrainConfig.__dataclass_fields__ and v is not None}
    return replace(cfg, **given), args.out, args.recalibrate


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Train (or ``--recalibrate``) from command-line arguments; returns the exit status.

    *prog* names the command in the help text and in the model card's
    ``command`` (``aiflat-local train`` passes its own name).
    """
    cfg, out, again = parse_args(argv, prog)
    command = prog + " " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log = lambda s: print(s, flush=True)  # noqa: E731
    if again:
        recalibrate(out, cfg, command=command, log=log)
    else:
        train(cfg, out, command=command, log=log)
    from .weights import repin

    manifest = repin(out)  # e.g. --out weights/dustnet: the store's pinned checksums follow the new files
    if manifest is not None:
        log(f"checksums of {Path(out).name} updated in {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

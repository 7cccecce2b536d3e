"""Flat accuracy by method on the simulator: single median + inpainting, temporal-median flat, KLL, motion CG.

For each seed a dusty video is simulated (``aiflat_local.synth``, drift and
seeing jitter, written as a SER and read back streaming), and each method
makes a flat, scored against the true flat:

``median+inpaint (classical)``
    The single-median route: temporal median -> classical masker -> harmonic
    inpainting -> ``build_flat`` (``aiflat_local.pipeline.make_flat``).
``median+inpaint (true mask)``
    The same with the simulator's true dust mask (the best that route can do).
``temporal-median flat``
    The naive flat: temporal median over its large-scale background, everywhere.
``KLL fixed point``
    The motion solution by the classic Kuhn-Lin-Loranz iteration (every pixel
    the average over all pairs of the pair difference plus the gain at the
    pair's other end, bilinear, 200 steps), same registration, evidence mask
    and flat builder as the next row.
``motion CG``
    This issue, as ``aiflat-local run`` does it: all-pairs least squares by
    conjugate gradients (``aiflat_local.motion.motion_flat``), mask from the
    motion evidence plus confirmed/border appearance objects (the ``motion``
    masker), the gain blended with the inpainting route's where motion has no
    support, and the motion route's soft mask
    (``aiflat_local.motion.motion_soft_mask``: within 3 px of the mask, weight
    by the significance of the gain's departure from 1, 0 below 2 sigma),
    i.e. ``aiflat_local.pipeline.motion_route_flat``.
``motion CG (soft mask 3/1.5)``
    The same gain and mask with a fixed soft mask: 3 px expansion, 1.5 px feather.
``motion CG (soft mask 10/3)``
    The same with the flat builder's default 10 px expansion and 3 px feather.

Two dust densities: the simulator's default (``--n-dust``, 25 on 480 x 640,
81 per megapixel) and the real case's (``--real-density``: the 46 objects of
at least 9 px of the cloud mask on the 960 x 1200 half image of
``shared/real``, 40 per megapixel, i.e. 12 on 480 x 640; the motion methods
only). For each video the rows also give the share of pixels whose *true*
flat departs from 1 by more than 0.1 % and 0.3 % (shadows with their halos
and rims): a flat cannot be exactly 1.0 there without leaving that dust in.

Metrics: median and p90 of ``|flat / true - 1|`` in strong dust (objects
deeper than 10 %), median in faint dust (3-10 %) and on the bright diffraction
rims (``true > 1.002``); the largest error on sunspots/pores away from dust and
the share of them touched by the mask; object recall (deep, 3-10 %); the share
of pixels exactly 1.0; time and peak memory (tracemalloc: numpy and Python
allocations) of making the flat.

    python benchmarks/flats.py                        # 4 seeds, 480 x 640, 48 frames
    python benchmarks/flats.py --speed                # + full size 1920 x 1200 x 200, end to end
    python benchmarks/flats.py --smoke --output /tmp/x  # tiny, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the package, when it is not installed
from _common import machine_info, write_results  # noqa: E402

VARIANTS = [  # cycled over the seeds
    {"label": "H-alpha", "config": {}},
    {"label": "H-alpha, obstructed (donuts)", "config": {"central_obstruction": 0.3}},
    {"label": "white light", "config": {"texture": "white_light"}},
    {"label": "Ca K, limb in the field", "config": {"texture": "cak", "limb": True}},
]
KLL_ITERATIONS = 200
METHODS = ["median+inpaint (classical)", "median+inpaint (true mask)", "temporal-median flat", "KLL fixed point",
           "motion CG", "motion CG (soft mask 3/1.5)", "motion CG (soft mask 10/3)"]
SPARSE_METHODS = ["motion CG", "motion CG (soft mask 3/1.5)"]
REAL_OBJECTS_PER_MPX = 46 / (960 * 1200 / 1e6)  # shared/real: cloud-mask objects >= 9 px on the half image
METRICS = [("deep_median", "deep med %", 100), ("deep_p90", "deep p90 %", 100), ("faint_median", "3-10% med %", 100),
           ("halo_median", "rim med %", 100), ("wing_median", "wing med %", 100), ("dark_max", "spot max %", 100),
           ("leak", "spots hit", 1), ("recall_deep", "rec>10%", 1), ("recall_faint", "rec3-10%", 1),
           ("exact_one", "exact 1.0", 1), ("true_beyond_0p1", "true>0.1%", 1), ("true_beyond_0p3", "true>0.3%", 1),
           ("time_s", "time s", 1), ("peak_mb", "peak MB", 1)]


# ----------------------------------------------------------------------------- data
def simulate(directory: Path, seed: int, size: tuple[int, int], frames: int, **extra):
    from aiflat_local.io.ser import write_ser
    from aiflat_local.synth import SimConfig, iter_frames, make_scene

    cfg = SimConfig(height=size[0], width=size[1], n_frames=frames, seed=seed, **extra)
    scene = make_scene(cfg)
    path = directory / f"sim{seed}.ser"
    write_ser(path, iter_frames(scene))
    return scene, path


# ----------------------------------------------------------------------------- methods
def _background(img: np.ndarray, size: int = 48) -> np.ndarray:
    """Large-scale background: a median filter on a 4x block-reduced image, bilinearly enlarged."""
    f = 4
    h, w = img.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    a = np.pad(img, ((0, hp - h), (0, wp - w)), mode="edge").reshape(hp // f, f, wp // f, f).mean(axis=(1, 3))
    a = ndimage.median_filter(a, size=size // f | 1, mode="nearest")
    return ndimage.zoom(a, (hp / a.shape[0], wp / a.shape[1]), order=1)[:h, :w]


def make_flat(method: str, path: Path, scene, reference: np.ndarray, cache: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """The flat (and the mask, when the method has one) of *method*."""
    from aiflat_local import motion as M
    from aiflat_local.flat import FlatParams, build_flat
    from aiflat_local.io.ser import SerReader
    from aiflat_local.masks import MASKERS
    from aiflat_local.pipeline import RunOptions, make_flat as pipeline_flat, motion_route_flat

    if method == "median+inpaint (classical)":
        with SerReader(path) as reader:
            mask = MASKERS.create("classical")(reference, frames=reader).binary
        return pipeline_flat(reference, mask, RunOptions(progress=False))[0].flat, mask
    if method == "median+inpaint (true mask)":
        mask = scene.dust_mask
        return pipeline_flat(reference, mask, RunOptions(progress=False))[0].flat, mask
    if method == "temporal-median flat":
        return (reference / _background(reference)).astype(np.float32), None
    if method == "KLL fixed point":
        with SerReader(path) as reader:
            mf = M.motion_flat(reader, solver="kll", kll_iterations=KLL_ITERATIONS, registration=cache.get("registration"))
        mask, _ = M.evidence_mask(mf)
        params = FlatParams(expand_px=3, sigma_px=1.5)
        return build_flat(reference, mask, gain=mf.gain, params=params).flat, mask
    if method.startswith("motion CG"):
        if "motion" not in cache:  # one solve per video, shared by the soft-mask variants (timed with the first)
            with SerReader(path) as reader:
                masker = MASKERS.create("motion")
                cache["motion"] = (masker(reference, frames=reader).binary, masker.motion)
        mask, mf = cache["motion"]
        cache["registration"] = mf.registration
        if method == "motion CG":
            options = RunOptions(progress=False)
            other = pipeline_flat(reference, mask, options)[0]
            return motion_route_flat(reference, mask, mf, other, options).flat, mask
        params = FlatParams(expand_px=3, sigma_px=1.5) if method == "motion CG (soft mask 3/1.5)" else FlatParams()
        gain = mf.gain
        if not mf.support.all():  # the frame border: blend with the inpainting route's gain there
            other = pipeline_flat(reference, mask, RunOptions(progress=False, flat=params))[0].gain
            gain = M.blend_gains(mf.gain, mf.support, other)
        return build_flat(reference, mask, gain=gain, params=params).flat, mask
    raise ValueError(method)


# ----------------------------------------------------------------------------- scoring
def score(flat: np.ndarray, mask: np.ndarray | None, scene) -> dict:
    from aiflat_local.metrics import dark_feature_leakage, flat_error, recall_by_depth

    depth = {o["label"]: o["depth"] for o in scene.dust_objects}
    labels = scene.dust_labels
    deep = np.isin(labels, [k for k, d in depth.items() if d > 0.10])
    faint = np.isin(labels, [k for k, d in depth.items() if 0.03 < d <= 0.10])
    rim = scene.true_flat > 1.002
    departure = np.abs(scene.true_flat.astype(np.float64) - 1.0)
    wing = (departure > 1e-3) & (labels == 0)  # shadow wings and halos: 0.1-1 % from 1, outside the labels
    spots = scene.dark_feature_mask & ~ndimage.binary_dilation(scene.dust_mask, iterations=3)
    out = {}
    for name, region in (("deep", deep), ("faint", faint), ("halo", rim), ("wing", wing)):
        e = flat_error(flat, scene.true_flat, region)
        out[f"{name}_median"] = e["median"]
        if name == "deep":
            out["deep_p90"] = e["p90"]
    out["dark_max"] = flat_error(flat, scene.true_flat, spots)["max"] if spots.any() else None
    out["exact_one"] = float(np.count_nonzero(flat == 1.0) / flat.size)
    out["true_beyond_0p1"] = float(np.mean(departure > 1e-3))
    out["true_beyond_0p3"] = float(np.mean(departure > 3e-3))
    if mask is not None:
        out["leak"] = dark_feature_leakage(mask, scene.dark_feature_mask, scene.dust_mask)
        out["recall_deep"] = recall_by_depth(mask, labels, depth, 0.10)
        out["recall_faint"] = recall_by_depth(mask, labels, depth, 0.03, max_depth=0.10)
    return out


def run_seed(seed: int, variant: dict, size, frames: int, work: Path, methods: list[str] = METHODS) -> list[dict]:
    from aiflat_local.io.ser import SerReader
    from aiflat_local.reference import temporal_median

    scene, path = simulate(work, seed, size, frames, **variant["config"])
    with SerReader(path) as reader:
        reference = temporal_median(reader)
    rows, cache = [], {}
    order = [m for m in methods if m.startswith("motion CG")] + [m for m in methods if not m.startswith("motion CG")]
    for method in order:  # motion first: KLL reuses its registration (same shifts, only the solver differs)
        tracemalloc.start()
        t = time.perf_counter()
        flat, mask = make_flat(method, path, scene, reference, cache)
        elapsed = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        row = {"seed": seed, "variant": variant["label"], "n_dust": variant["config"].get("n_dust", 25),
               "method": method, "time_s": round(elapsed, 2),
               "peak_mb": round(peak, 1), **score(flat, mask, scene)}
        rows.append(row)
        print(f"  seed {seed} {method:28s} " + "  ".join(_fmt(row.get(k), f) for k, _, f in METRICS), flush=True)
    path.unlink()
    return rows


def _fmt(v, factor) -> str:
    if v is None:
        return "     -"
    return f"{v * factor:6.2f}" if factor != 1 or isinstance(v, float) else f"{v:6d}"


def summarise(rows: list[dict]) -> dict:
    """Per method: the mean over seeds of each metric, and the worst (max error / min recall)."""
    out = {}
    for method in METHODS:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        s = {}
        for key, _, _ in METRICS:
            vals = [r[key] for r in sel if r.get(key) is not None]
            if not vals:
                continue
            s[key] = float(np.mean(vals))
            worst = min(vals) if key.startswith(("recall", "exact")) else max(vals)
            s[f"{key}_worst"] = float(worst)
        out[method] = s
    return out


def table(summary: dict) -> str:
    head = f"{'method':30s}" + "".join(f"{label:>12s}" for _, label, _ in METRICS)
    lines = [head, "-" * len(head)]
    for method, s in summary.items():
        cells = []
        for key, _, factor in METRICS:
            v = s.get(key)
            cells.append(f"{'-':>12s}" if v is None else f"{v * factor:12.3f}")
        lines.append(f"{method:30s}" + "".join(cells))
    return "\n".join(lines)


def tables(summary: dict, sparse: dict, speed: list[dict], args, n_dust: int, n_real: int) -> list[dict]:
    """The markdown tables of benchmarks/README.md (``benchmarks/tables.py`` renders them as is)."""
    cols = ["method"] + [label for key, label, _ in METRICS]

    def rows_of(s: dict) -> list[list]:
        out = []
        for method, v in s.items():
            cells = [method]
            for key, _, factor in METRICS:
                val = v.get(key)
                cells.append(None if val is None else round(val * (100 if factor == 100 else 1), 3 if factor == 100
                                                             or key.startswith(("exact", "true", "recall", "leak"))
                                                             else 1))
            out.append(cells)
        return out

    size = f"{args.size[0]} x {args.size[1]} x {args.frames} frames, seeds {args.seeds}"
    variants = ", ".join(VARIANTS[i % len(VARIANTS)]["label"] for i in range(len(args.seeds)))
    out = [{"title": f"simulator, {size}, {n_dust} dust (the simulator's default, "
                     f"{n_dust / (args.size[0] * args.size[1] / 1e6):.0f} per megapixel), variants: {variants} "
                     "(means; true>0.1% / true>0.3%: share of pixels whose true flat departs from 1 by more)",
            "columns": cols, "rows": rows_of(summary)}]
    if sparse:
        out.append({"title": f"the same at the real case's density: {n_real} dust ({REAL_OBJECTS_PER_MPX:.0f} per "
                             "megapixel, the cloud mask's objects of at least 9 px in shared/real)",
                    "columns": cols, "rows": rows_of(sparse)})
    if speed:
        out.append({
            "title": f"motion route at full size ({args.speed_size[1]} x {args.speed_size[0]} x {args.speed_frames} "
                     "frames, 16-bit, 25 dust)",
            "columns": ["frames used", "total s", "peak RSS MB", "deep med %", "deep p90 %", "exact 1.0"],
            "rows": [[s["frames_used"], s["times_s"]["total"], round(s["peak_rss_mb"]), round(100 * s["deep_median"], 3),
                      round(100 * s["deep_p90"], 3), round(s["exact_one"], 3)] for s in speed],
        })
    return out


# ----------------------------------------------------------------------------- speed (full size)
SPEED_CHILD = r"""
import json, resource, sys, time
import numpy as np
from aiflat_local import motion as M
from aiflat_local.calibrate import calibrate_ser
from aiflat_local.flat import FlatParams, build_flat, soft_mask
from aiflat_local.io.ser import SerReader
from aiflat_local.masks import MASKERS
from aiflat_local.reference import temporal_median
path, out, max_frames, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter(); times = {}
with SerReader(path) as reader:
    t = time.perf_counter(); reference = temporal_median(reader); times["reference"] = time.perf_counter() - t
    t = time.perf_counter()
    masker = MASKERS.create("motion", max_frames=max_frames, device=device, confirm=None)
    mask = masker(reference, frames=reader).binary
    times["motion_flat_and_mask"] = time.perf_counter() - t
mf = masker.motion
t = time.perf_counter()
params = FlatParams(expand_px=3, sigma_px=1.5)  # the motion route's (RunOptions.motion_flat_params)
weight = M.motion_soft_mask(mf, mask, reach_px=params.expand_px, outside=soft_mask(mask, 3, 1.5))
flat = build_flat(reference, mask, gain=mf.gain, params=params, weight=weight).flat
times["build_flat"] = time.perf_counter() - t
t = time.perf_counter(); calibrate_ser(path, flat, out); times["calibrate"] = time.perf_counter() - t
times["total"] = time.perf_counter() - t0
np.save(out + ".flat.npy", flat); np.save(out + ".mask.npy", mask)
print(json.dumps({"times_s": {k: round(v, 2) for k, v in times.items()},
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "motion": {k: mf.stats[k] for k in ("timings_s", "solves")}}))
"""


def run_speed(work: Path, size, frames: int, subsets: list[int], device: str) -> list[dict]:
    """End to end on a full-size video, each subset size in its own process (peak RSS its own)."""
    print(f"speed: simulating {size[1]} x {size[0]} x {frames} (16-bit)", flush=True)
    scene, path = simulate(work, 7, size, frames, central_obstruction=0.3)
    out = []
    for n in subsets:
        target = str(work / f"cal{n}.ser")
        res = subprocess.run([sys.executable, "-c", SPEED_CHILD, str(path), target, str(n), device],
                             capture_output=True, text=True, check=True)
        info = json.loads(res.stdout.strip().splitlines()[-1])
        flat = np.load(target + ".flat.npy")
        mask = np.load(target + ".mask.npy")
        info.update({"frames_in_video": frames, "frames_used": n, "size": list(size), **score(flat, mask, scene)})
        out.append(info)
        print(f"  {n} of {frames} frames: total {info['times_s']['total']:.1f} s ({info['times_s']}), "
              f"peak RSS {info['peak_rss_mb']:.0f} MB, deep med {100 * info['deep_median']:.3f} % "
              f"p90 {100 * info['deep_p90']:.3f} %, exact 1.0 {info['exact_one']:.3f}", flush=True)
        Path(target).unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--n-dust", type=int, default=None, help="dust particles (default: the simulator's 25)")
    parser.add_argument("--no-real-density", dest="real_density", action="store_false",
                        help="skip the second condition: dust as dense as in the real case (motion methods only)")
    parser.add_argument("--speed", action="store_true", help="also the full-size end-to-end run (minutes)")
    parser.add_argument("--speed-size", type=int, nargs=2, default=[1200, 1920], metavar=("H", "W"))
    parser.add_argument("--speed-frames", type=int, default=200)
    parser.add_argument("--speed-subsets", type=int, nargs="+", default=[48, 96])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the motion solve of --speed)")
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, proves the script runs")
    parser.add_argument("--output", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.size, args.frames, args.n_dust, args.real_density = [0], [128, 160], 16, 6, False
        args.speed_size, args.speed_frames, args.speed_subsets = [96, 128], 12, [8]

    n_dust = args.n_dust or 25
    n_real = max(1, round(REAL_OBJECTS_PER_MPX * args.size[0] * args.size[1] / 1e6))
    rows, sparse_rows, speed = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        conditions = [(n_dust, METHODS, rows)] + ([(n_real, SPARSE_METHODS, sparse_rows)] if args.real_density else [])
        for n, methods, out in conditions:
            for i, seed in enumerate(args.seeds):
                variant = VARIANTS[i % len(VARIANTS)]
                print(f"seed {seed}: {variant['label']}, {args.size[1]} x {args.size[0]} x {args.frames}, "
                      f"{n} dust", flush=True)
                config = {**variant["config"], "n_dust": n}
                out += run_seed(seed, {**variant, "config": config}, args.size, args.frames, work, methods)
        if args.speed or args.smoke:
            speed = run_speed(work, args.speed_size, args.speed_frames, args.speed_subsets, args.device)
    summary = summarise(rows)
    sparse = summarise(sparse_rows)
    print(f"\nmean over seeds, {n_dust} dust (errors in %, times in s):")
    print(table(summary))
    if sparse_rows:
        print(f"\nmean over seeds, {n_real} dust (the real case's density):")
        print(table(sparse))
    result = {
        "benchmark": "flats", "command": "python benchmarks/flats.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "config": {"seeds": args.seeds, "variants": [VARIANTS[i % len(VARIANTS)]["label"] for i in range(len(args.seeds))],
                   "size": args.size, "frames": args.frames, "n_dust": n_dust,
                   "n_dust_real_density": n_real if args.real_density else None,
                   "real_objects_per_mpx": round(REAL_OBJECTS_PER_MPX, 1)},
        "metrics": {k: label for k, label, _ in METRICS}, "rows": rows + sparse_rows, "summary": summary,
        "summary_real_density": sparse, "speed": speed,
        "tables": tables(summary, sparse, speed, args, n_dust, n_real),
        "peak_rss_mb_this_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    path = write_results("flats", result, args.output, smoke=args.smoke)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

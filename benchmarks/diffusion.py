"""Diffusion inpainting against the deterministic inpainters: flat error inside dust on the simulator.

For each seed: simulate a dusty video, run the pipeline once (classical masker, harmonic fill) for
the reference and the detected mask, then fill that same mask with every inpainter (harmonic,
biharmonic, and each diffusion model found in the weights store), build the flat with the same
`build_flat`, and score it against the simulator's true flat inside deep dust (|flat / true - 1|,
median and p90, as `aiflat-local demo` does). With an ensemble, it also reports the spread
(robust std of the samples, relative to the fill) and how well it ranks the actual error.

Weights are never downloaded: models missing from the store are listed with the command that
fetches them on a connected machine, and the script still exits 0.

    python benchmarks/diffusion.py                                   # sd-inpainting, sdxl-inpainting
    python benchmarks/diffusion.py --device cuda --ensemble 5 --seeds 0 1 2
    python benchmarks/diffusion.py --models /path/to/diffusers-folder --steps 30
    python benchmarks/diffusion.py --smoke --output /tmp/x           # tiny random model, seconds (CI)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_results  # noqa: E402

DETERMINISTIC = ["harmonic", "biharmonic"]


def find_models(names: list[str], weights_dir: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """Split model names/paths into ``found {name: folder}`` and ``missing {name: why + fetch}``."""
    from aiflat_local.errors import AiflatError
    from aiflat_local.inpaint._diffusion_model import pipeline_class_name, resolve_model

    found, missing = {}, {}
    for name in names:
        try:
            root, _ = resolve_model(name, weights_dir)
            pipeline_class_name(root)
            found[name] = str(root)
        except AiflatError as exc:
            missing[name] = str(exc)
    return found, missing


def score(flat: np.ndarray, true_flat: np.ndarray, deep: np.ndarray) -> dict:
    from aiflat_local.metrics import flat_error

    err = flat_error(flat, true_flat, deep)
    return {"deep_dust_flat_error_median": err["median"], "deep_dust_flat_error_p90": err["p90"],
            "n_pixels": err["n_pixels"]}


def spread_stats(spread: np.ndarray | None, inpainted: np.ndarray, flat: np.ndarray, true_flat: np.ndarray,
                 deep: np.ndarray) -> dict:
    """Relative spread inside deep dust and its rank correlation with the actual flat error."""
    if spread is None:
        return {}
    from scipy.stats import spearmanr

    sel = deep & (inpainted > 0) & np.isfinite(spread)
    rel = spread[sel] / inpainted[sel]
    err = np.abs(flat[sel].astype(np.float64) / true_flat[sel] - 1.0)
    rho = float(spearmanr(rel, err).statistic) if rel.size > 2 and np.ptp(rel) > 0 and np.ptp(err) > 0 else None
    return {"rel_spread_median": float(np.median(rel)) if rel.size else None, "spread_error_spearman": rho}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd-inpainting", "sdxl-inpainting"],
                        help="weights-store names or diffusers folders")
    parser.add_argument("--weights-dir", default=None, help="weights store (default: the usual one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--mask", choices=["detected", "truth"], default="detected",
                        help="fill the classical masker's mask (as a run would) or the true dust mask")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--ensemble", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--crop-size", type=int, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny inputs; without weights, a tiny random model (proves the script runs)")
    parser.add_argument("--output", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.size, args.frames, args.steps = [0], [96, 128], 6, 2
        args.ensemble = max(args.ensemble, 2)

    found, missing = find_models(args.models, args.weights_dir)
    for name, why in missing.items():
        print(f"weights not found: {name}: {why}", flush=True)
    result = {"benchmark": "diffusion",
              "command": "python benchmarks/diffusion.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "missing_weights": missing, "found_weights": found,
              "config": {"seeds": args.seeds, "size": args.size, "frames": args.frames, "mask": args.mask,
                         "device": args.device, "dtype": args.dtype, "steps": args.steps,
                         "ensemble": args.ensemble, "batch_size": args.batch_size, "crop_size": args.crop_size}}

    with tempfile.TemporaryDirectory() as work:
        models = dict(found)
        if not models and args.smoke:
            from aiflat_local.inpaint._diffusion_tiny import make_tiny_inpaint_pipeline

            models["tiny-random (smoke only: numbers mean nothing)"] = str(
                make_tiny_inpaint_pipeline(Path(work) / "tiny-random"))
            args.crop_size = args.crop_size or 64
        if not models:
            print("no diffusion weights found: nothing to compare (bring them with the fetch commands above)")
            result["status"] = "no weights"
            path = write_results("diffusion", result, args.output, smoke=args.smoke)
            print(f"wrote {path}")
            return 0
        versions = _torch_versions()
        if versions:
            result["machine"].update(versions)
        rows = run_all(args, models, Path(work))
    result["rows"] = rows
    result["summary"] = summarise(rows)
    result["status"] = "ok"
    print("\nmean over seeds:")
    for name, s in result["summary"].items():
        print(f"  {name:50s} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in s.items()))
    path = write_results("diffusion", result, args.output, smoke=args.smoke)
    print(f"wrote {path}")
    return 0


def _torch_versions() -> dict:
    try:
        import diffusers
        import torch
    except ImportError:
        return {}
    info = {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


def run_all(args, models: dict[str, str], work: Path) -> list[dict]:
    from aiflat_local.flat import FlatParams, build_flat, inpaint_region
    from aiflat_local.inpaint import INPAINTERS
    from aiflat_local.io import read_image, read_mask
    from aiflat_local.pipeline import RunOptions, run
    from aiflat_local.synth import SimConfig, simulate

    import json

    rows = []
    params = FlatParams()
    inpainters = {name: (name, {}) for name in DETERMINISTIC}
    for label, folder in models.items():
        inpainters[label] = ("diffusion", dict(
            model=folder, device=args.device, dtype=args.dtype, steps=args.steps, ensemble=args.ensemble,
            batch_size=args.batch_size, crop_size=args.crop_size, seed=0))
    built = {label: INPAINTERS.create(kind, **opts) for label, (kind, opts) in inpainters.items()}
    for seed in args.seeds:
        config = SimConfig(height=args.size[0], width=args.size[1], n_frames=args.frames, seed=seed)
        sim = simulate(work / f"sim{seed}", config)
        out = work / f"run{seed}"
        run(sim.video, out, RunOptions(inpainter="harmonic", progress=False))
        reference, _ = read_image(out / "reference.fits")
        true_flat, _ = read_image(sim.true_flat)
        labels, _ = read_image(sim.dust_labels)
        truth = json.loads(sim.truth.read_text())
        deep_ids = [int(o["label"]) for o in truth["objects"] if float(o["depth"]) > 0.10]
        deep = np.isin(labels.astype(np.int32), deep_ids)
        mask = read_mask(out / "mask.png") if args.mask == "detected" else read_mask(sim.dust_mask)
        region = inpaint_region(mask, params)
        for label, inpainter in built.items():
            t = time.perf_counter()
            res = inpainter(reference, region)
            elapsed = time.perf_counter() - t
            flat = build_flat(reference, mask, inpainted=res.image, params=params).flat
            row = {"seed": seed, "inpainter": label, "time_s": round(elapsed, 2),
                   **score(flat, true_flat, deep), **spread_stats(res.spread, res.image, flat, true_flat, deep)}
            for key in ("n_windows", "n_model_calls", "n_samples"):
                if key in res.params:
                    row[key] = res.params[key]
            rows.append(row)
            med, p90 = row["deep_dust_flat_error_median"], row["deep_dust_flat_error_p90"]
            extra = ""
            if "rel_spread_median" in row and row["rel_spread_median"] is not None:
                extra = f"  rel spread {100 * row['rel_spread_median']:.2f}%  rho {row['spread_error_spearman']}"
            print(f"seed {seed} {label:50s} flat err med {100 * (med or 0):.2f}%  p90 {100 * (p90 or 0):.2f}%  "
                  f"{elapsed:.1f}s{extra}", flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for label in dict.fromkeys(r["inpainter"] for r in rows):
        sel = [r for r in rows if r["inpainter"] == label]
        s = {}
        for key in ("deep_dust_flat_error_median", "deep_dust_flat_error_p90", "time_s", "rel_spread_median",
                    "spread_error_spearman"):
            vals = [r[key] for r in sel if r.get(key) is not None]
            if vals:
                s[key] = float(np.mean(vals))
        out[label] = s
    return out


if __name__ == "__main__":
    raise SystemExit(main())

"""SAM masker benchmark: agreement with the cloud mask (real case) and the simulator's truth, time per megapixel.

For every SAM-family model present in the weights store (or those named with
``--model``), every device and prompt mode: run ``--masker sam`` on

- the real case in ``../shared/real`` (the cloud tool's median and mask; the
  cloud mask is a reference, not the truth), and
- simulated references (temporal medians of seeded simulator videos), scored
  against the ground truth,

and report pixel IoU, object recall and precision, recall of deep (> 10 %)
and medium (3-10 %) dust, the number of candidates SAM could not improve on
(fallbacks to the proposer), and seconds per megapixel excluding model
loading. The classical masker runs on the same inputs in the same process
for a side-by-side ratio.

Weights missing: it prints which ones and how to get them, writes that to
the results and exits 0.

    python benchmarks/sam.py                                  # all SAM models present; cpu (+cuda)
    python benchmarks/sam.py --model sam-vit-base --device cuda --prompt-mode points boxes
    python benchmarks/sam.py --smoke --output /tmp/x          # CI: tiny random model, tiny inputs
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

SAM_KINDS = ("sam-hf", "sam_hq-hf", "sam2-hf", "sam3-hf", "sam-meta-checkpoint")
DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "real"


def find_models(store, names):
    """(present [(label, model argument)], missing [dicts]) for the SAM-family models asked for."""
    from aiflat_local.errors import WeightsError

    if not names:
        names = sorted(n for n, e in store.models.items() if e.get("kind") in SAM_KINDS)
    present, missing = [], []
    for name in names:
        try:
            store.resolve(name, hash_files=False)
            present.append((name, name))
        except WeightsError as exc:
            entry = store.models.get(name, {})
            missing.append({"name": name, "kind": entry.get("kind"), "fetch": entry.get("fetch"),
                            "source": entry.get("source"), "error": str(exc)})
    return present, missing


def tiny_random_model(directory: Path) -> Path:
    """A tiny random SamModel in transformers' layout (smoke runs only: its masks mean nothing)."""
    from aiflat_local.masks._sam_tiny import write_tiny_sam

    path = directory / "tiny-random-sam"
    write_tiny_sam(path, num_hidden_layers=1)
    return path


def load_cases(args):
    """[(case name, reference float32, truth dict)] for the real case and the simulated seeds."""
    from aiflat_local.io import read_image, read_mask
    from aiflat_local.synth import SimConfig, iter_frames, make_scene

    cases = []
    real = Path(args.real)
    if (real / "median_left.png").is_file() and (real / "cloud_mask_left.png").is_file():
        ref, _ = read_image(real / "median_left.png")
        ref = ref.mean(axis=2) if ref.ndim == 3 else ref
        cloud = read_mask(real / "cloud_mask_left.png")
        if args.smoke:  # a corner with dust, to stay fast
            ref, cloud = ref[:192, :192], cloud[:192, :192]
        cases.append(("real_cloud", ref.astype(np.float32), {"mask": cloud}))
    else:
        print(f"real case not found in {real}: skipped", flush=True)
    for seed in args.seeds:
        scene = make_scene(SimConfig(height=args.size[0], width=args.size[1], n_frames=args.frames, seed=seed,
                                     central_obstruction=0.3))
        ref = np.median(np.stack(list(iter_frames(scene))), axis=0).astype(np.float32)
        cases.append((f"sim_seed{seed}", ref, {"mask": scene.dust_mask, "labels": scene.dust_labels,
                                                "objects": scene.dust_objects}))
    return cases


def score(pred: np.ndarray, truth: dict) -> dict:
    from aiflat_local.metrics import compare_masks, recall_by_depth_detail

    m = compare_masks(pred, truth["mask"])
    out = {k: m[k] for k in ("pixel_iou", "dice", "object_recall", "object_precision", "object_f1",
                             "pred_pixels", "ref_pixels")}
    if "labels" in truth:
        out["recall_deep_gt10pct"] = recall_by_depth_detail(pred, truth["labels"], truth["objects"], 0.10)["recall"]
        out["recall_medium_3_10pct"] = recall_by_depth_detail(pred, truth["labels"], truth["objects"], 0.03,
                                                              0.10)["recall"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=None, help="weights names or paths (default: all SAM present)")
    parser.add_argument("--weights-dir", default=None, help="weights store (default $AIFLAT_WEIGHTS or ./weights)")
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL, help="folder of the real case")
    parser.add_argument("--device", nargs="+", default=None, help="devices (default: cpu, and cuda if present)")
    parser.add_argument("--dtype", default="auto", help="float32, float16, or auto (float16 on cuda)")
    parser.add_argument("--prompt-mode", nargs="+", default=["points"], choices=["points", "boxes", "text", "grid"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--tile-px", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="tiny inputs and a tiny random model (CI)")
    parser.add_argument("--output", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.size, args.frames, args.tile_px = [0], [96, 128], 4, 64

    from aiflat_local.weights import WeightStore, force_offline

    force_offline()
    store = WeightStore(args.weights_dir)
    present, missing = find_models(store, args.model)
    command = "python benchmarks/sam.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "sam", "command": command, "machine": machine_info(),
              "weights_directory": str(store.directory), "missing_weights": missing, "rows": []}
    if missing:
        print(f"weights not found in {store.directory} ({len(missing)}):")
        for m in missing:
            print(f"  {m['name']:20s} get it on a connected machine: {m['fetch'] or m['error']}")
    tmp = tempfile.TemporaryDirectory()
    if args.smoke:
        present.append(("tiny-random (smoke only)", str(tiny_random_model(Path(tmp.name)))))
    if not present:
        result["status"] = "no weights"
        result["tables"] = _tables(result)
        path = write_results("sam", result, args.output, smoke=args.smoke)
        print(f"no SAM weights to benchmark; wrote {path}")
        return 0

    import torch

    from aiflat_local.errors import AiflatError
    from aiflat_local.masks import MASKERS

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    cases = load_cases(args)
    result["config"] = {"seeds": args.seeds, "size": args.size, "frames": args.frames, "tile_px": args.tile_px,
                        "devices": devices, "prompt_modes": args.prompt_mode, "torch": torch.__version__}
    classical = {}
    for case, ref, truth in cases:
        t = time.perf_counter()
        pred = MASKERS.create("classical")(ref).binary
        sec = time.perf_counter() - t
        classical[case] = sec / (ref.size / 1e6)
        row = {"model": "classical", "device": "cpu", "prompt_mode": "-", "case": case,
               "seconds_per_mp": round(classical[case], 3), **score(pred, truth)}
        result["rows"].append(row)
        _print(row)
    for name, model in present:
        for device in devices:
            dtype = ("float16" if device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
            for mode in args.prompt_mode:
                try:
                    masker = MASKERS.create("sam", model=model, device=device, dtype=dtype, prompt_mode=mode,
                                            tile_px=args.tile_px, overlap_px=args.tile_px // 4,
                                            weights_dir=args.weights_dir)
                except AiflatError as exc:
                    result["rows"].append({"model": name, "device": device, "prompt_mode": mode, "skipped": str(exc)})
                    print(f"{name} {device} {mode}: skipped ({exc})", flush=True)
                    continue
                for case, ref, truth in cases:
                    try:
                        res = masker(ref)
                    except AiflatError as exc:
                        result["rows"].append({"model": name, "device": device, "prompt_mode": mode, "case": case,
                                               "skipped": str(exc)})
                        print(f"{name} {device} {mode} {case}: skipped ({exc})", flush=True)
                        break
                    p = res.params
                    compute = p["seconds"] - p["seconds_load"]
                    mp = ref.size / 1e6
                    row = {"model": name, "device": device, "dtype": dtype, "prompt_mode": mode, "case": case,
                           "seconds_per_mp": round(compute / mp, 3),
                           "ratio_to_classical": round(compute / mp / max(classical[case], 1e-9), 2),
                           "seconds_load": p["seconds_load"], "n_windows": p["n_windows"],
                           "n_candidates": p["n_candidates"], "n_fallback": p["n_fallback"],
                           "rejected": p["rejected"], **score(res.binary, truth)}
                    result["rows"].append(row)
                    _print(row)
    result["status"] = "ok"
    result["tables"] = _tables(result)
    path = write_results("sam", result, args.output, smoke=args.smoke)
    print(f"wrote {path}")
    tmp.cleanup()
    return 0


def _tables(result: dict) -> list[dict]:
    """Markdown-ready tables (benchmarks/tables.py): the measurements, then the weights not found."""
    tables = []
    rows = [r for r in result["rows"] if "skipped" not in r]
    if rows:
        cols = ["model", "device", "prompt_mode", "case", "pixel_iou", "object_recall", "object_precision",
                "recall_deep_gt10pct", "n_fallback", "seconds_per_mp", "ratio_to_classical"]
        tables.append({"title": "agreement (real_cloud: with the cloud mask; sim: with the simulator's truth) "
                                "and time per megapixel (model loading excluded)",
                       "columns": cols, "rows": [[r.get(c, "") if r.get(c) is not None else "" for c in cols]
                                                 for r in rows]})
    if result.get("missing_weights"):
        tables.append({"title": f"weights not found in {result['weights_directory']} (bring them to benchmark)",
                       "columns": ["model", "kind", "get it on a connected machine"],
                       "rows": [[m["name"], m.get("kind") or "", f"`{m.get('fetch') or m['error']}`"]
                                for m in result["missing_weights"]]})
    return tables


def _print(row: dict) -> None:
    extra = ""
    if row.get("recall_deep_gt10pct") is not None:
        extra = f"  deep-recall {row['recall_deep_gt10pct']:.3f}"
    fb = f"  fallback {row['n_fallback']}/{row['n_candidates']}" if "n_fallback" in row else ""
    print(f"{row['model'][:26]:26s} {row['device']:5s} {row['prompt_mode']:6s} {row['case']:12s} "
          f"IoU {row['pixel_iou']:.3f}  obj-recall {row['object_recall']:.3f}  obj-prec {row['object_precision']:.3f}"
          f"{extra}{fb}  {row['seconds_per_mp']:.2f} s/MP", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

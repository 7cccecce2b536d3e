"""Every masker against the cloud tool's masks and against the simulator's ground truth, side by side.

1. Cloud pairs (a reference image + the cloud model's mask for it, given as
   ``--pair REFERENCE CLOUD_MASK``; default: the real case in ``../shared/real``
   when present). Each single-image masker (classical, dustnet, SAM when its
   weights are present) and every ``--mask-file`` of the same size is scored
   against the cloud mask: pixel IoU, Dice, object recall/precision/F1 (objects
   of at least 9 px, 2 px tolerance), time per megapixel. The cloud mask is a
   reference, not the truth (it misses many faint shadows), so the places where
   a masker and the cloud disagree are cut out into a contact sheet
   (``results/sheets/masks_<pair>.png``, not committed: it holds crops of the
   input) for a person to judge.
2. Simulator ground truth over a fixed grid of conditions (f-ratio, dust
   density, seeing, motion, an 8-bit JPEG reference) and seeds. Each masker
   runs from the median alone and, where it uses them, with the frames
   ("+frames"; "motion" always uses them). Metrics (pooled over the seeds):
   pixel IoU and Dice with dust deeper than 10 % (its full extent; shallower
   dust neither rewarded nor punished), pixel IoU with all dust (every object's
   extent where the true flat departs from 1 by more than 1 %), object recall of that dust and of 3-10 %
   dust (2 px tolerance), object precision (mask objects of at least 9 px
   within 2 px of any dust) and F1 (with the recall of dust deeper than 3 %),
   dark solar features (sunspots, pores) wrongly masked, time per megapixel.

::

    python benchmarks/masks.py                         # ~10 min on 2 cores
    python benchmarks/masks.py --pair ref.png cloud.png --mask-file other_tool_mask.png
    python benchmarks/masks.py --conditions default jpeg75 --seeds 0 1
    python benchmarks/masks.py --smoke --output /tmp/x # seconds (CI)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_results  # noqa: E402
from _maskbench import DEFAULT_REAL, contact_sheet, disagreements  # noqa: E402

# condition name -> SimConfig overrides (on top of the simulator's defaults: f/30, 25 dust, seeing
# blur 1 px, drift 6 px, jitter 2 px). "jpeg75" keeps the default video but gives the maskers its
# median as an 8-bit JPEG of quality 75 (as reference images are often shared).
CONDITIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "f/15": {"f_ratio": 15.0},
    "f/45 donuts": {"f_ratio": 45.0, "central_obstruction": 0.35},
    "sparse dust (8)": {"n_dust": 8},
    "dense dust (50)": {"n_dust": 50},
    "poor seeing": {"seeing_blur_px": 2.5, "jitter_px": 4.0},
    "still mount": {"drift_px": 0.0, "jitter_px": 0.3},
    "large drift": {"drift_px": 30.0, "jitter_px": 3.0},
    "jpeg75": {"_jpeg": 75},
}
# maskers that look at the frames when given them (besides "motion", which needs them)
USES_FRAMES = ("classical", "dustnet")


@dataclass
class Masker:
    """One column of the tables: a masker and how it is called."""

    label: str
    run: Callable[[np.ndarray, Any], np.ndarray]  # (reference, frames or None) -> bool mask
    single_image: bool  # runs on a reference alone (cloud pairs)
    with_frames: bool  # gets the video's frames on the simulator
    info: dict[str, Any] = field(default_factory=dict)


def build_maskers(names: list[str] | None, sam_models: list[str] | None, log=print) -> tuple[list[Masker], dict]:
    """The maskers to score, and {name: reason} for the ones that cannot run here."""
    from aiflat_local.errors import AiflatError
    from aiflat_local.masks import MASKERS
    from aiflat_local.weights import WeightStore

    wanted = names or [n for n in MASKERS.names()]
    out, skipped = [], {}
    for name in wanted:
        info = MASKERS.info(name)
        if name == "sam":
            from sam import find_models

            present, missing = find_models(WeightStore(), sam_models)
            if not present:
                skipped["sam"] = f"no SAM-family weights in the store ({len(missing)} known models missing)"
                continue
            for label, model in present:
                try:
                    m = MASKERS.create("sam", model=model)
                except AiflatError as exc:
                    skipped[f"sam:{label}"] = str(exc)
                    continue
                out.append(Masker(f"sam:{label}", lambda r, f, m=m: m(r).binary, True, False, {"model": model}))
            continue
        try:
            masker = MASKERS.create(name)
        except AiflatError as exc:  # missing package or weights
            skipped[name] = str(exc)
            continue
        params = masker.params() if hasattr(masker, "params") else {}
        if info.needs_frames:
            out.append(Masker(name, lambda r, f, m=masker: m(r, frames=f).binary, False, True, params))
            continue
        out.append(Masker(name, lambda r, f, m=masker: m(r).binary, True, False, params))
        if name in USES_FRAMES:
            out.append(Masker(f"{name}+frames", lambda r, f, m=masker: m(r, frames=f).binary, False, True, params))
    for name, why in skipped.items():
        log(f"  skipped {name}: {why}")
    return out, skipped


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    mask = fn()
    return np.asarray(mask, bool), time.perf_counter() - t


def _jpeg_reference(reference: np.ndarray, quality: int) -> np.ndarray:
    """The reference as a viewer would share it: scaled to 8 bits (minimum to 99.9th percentile), JPEG round trip."""
    from aiflat_local.train import jpeg_round_trip

    lo, hi = np.percentile(reference, [0.0, 99.9])
    img8 = np.clip((reference - lo) / max(hi - lo, 1e-6) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return jpeg_round_trip(img8, quality)


# --------------------------------------------------------------------------- simulator grid
def sim_configs(condition: str, seeds: list[int], size: tuple[int, int], n_frames: int):
    from aiflat_local.synth import SimConfig

    overrides = {k: v for k, v in CONDITIONS[condition].items() if not k.startswith("_")}
    base = SimConfig(height=size[0], width=size[1], n_frames=n_frames)
    return [replace(base, seed=int(s), **overrides) for s in seeds]


def score_sim(mask: np.ndarray, scene: Any) -> dict[str, Any]:
    """Counts that pool over seeds (see :func:`aiflat_local.train.score_mask`), plus the overlap with all dust.

    ``inter_dust``/``union_dust``: against every dust object's extent (where the
    true flat departs from 1 by more than 1 %), whatever its depth.
    """
    from aiflat_local.train import score_mask

    dust = scene.dust_labels > 0
    return {**score_mask(mask, scene), "inter_dust": int(np.count_nonzero(mask & dust)),
            "union_dust": int(np.count_nonzero(mask | dust)), "mask_pixels": int(np.count_nonzero(mask))}


def pool(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled figures of one (condition, masker) cell over its seeds (or of one masker over all conditions)."""
    s = {k: sum(r[k] for r in rows) for k in ("inter_deep", "union_deep", "inter_dust", "union_dust", "n_deep", "found_deep", "n_medium",
                                               "found_medium", "n_dark", "dark_masked", "pred_objects",
                                               "false_objects", "seconds", "megapixels")}
    iou = s["inter_deep"] / max(s["union_deep"], 1)
    precision = 1.0 - s["false_objects"] / s["pred_objects"] if s["pred_objects"] else 1.0
    recall_3 = (s["found_deep"] + s["found_medium"]) / max(s["n_deep"] + s["n_medium"], 1)
    return {
        "iou_deep": iou,
        "dice_deep": 2 * iou / (1 + iou),
        "iou_dust": s["inter_dust"] / max(s["union_dust"], 1),
        "recall_deep": s["found_deep"] / max(s["n_deep"], 1),
        "recall_3_10pct": s["found_medium"] / max(s["n_medium"], 1),
        "precision": precision,
        "f1": 2 * precision * recall_3 / max(precision + recall_3, 1e-12),
        "dark_features_masked": s["dark_masked"] / max(s["n_dark"], 1),
        "seconds_per_mp": s["seconds"] / max(s["megapixels"], 1e-12),
        **s,
    }


def run_simulator(maskers: list[Masker], conditions: list[str], seeds: list[int], size: tuple[int, int],
                  n_frames: int, log=print) -> dict[str, Any]:
    from aiflat_local.train import simulated_video

    table: dict[str, Any] = {}
    for condition in conditions:
        rows: dict[str, list] = {m.label: [] for m in maskers}
        jpeg = CONDITIONS[condition].get("_jpeg")
        for config in sim_configs(condition, seeds, size, n_frames):
            frames, median, scene = simulated_video(config)
            reference = _jpeg_reference(median, jpeg) if jpeg else median
            mp = reference.size / 1e6
            for m in maskers:
                mask, seconds = _timed(lambda: m.run(reference, frames if m.with_frames else None))
                rows[m.label].append({"seed": config.seed, **score_sim(mask, scene), "seconds": seconds,
                                      "megapixels": mp})
        table[condition] = {"overrides": CONDITIONS[condition],
                            "maskers": {label: {"pooled": pool(r), "seeds": [
                                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                 if k in ("seed", "iou_deep", "found_deep", "n_deep", "dark_masked", "n_dark",
                                          "false_objects", "seconds")} for row in r]}
                                for label, r in rows.items()}}
        log(f"\n{condition} (seeds {seeds})")
        log(f"  {'masker':18s} {'IoU':>6s} {'Dice':>6s} {'IoUall':>6s} {'rec>10%':>8s} {'rec3-10':>8s} {'prec':>6s} "
            f"{'F1':>6s} {'dark':>6s} {'s/MP':>7s}")
        for label, cell in table[condition]["maskers"].items():
            p = cell["pooled"]
            log(f"  {label:18s} {p['iou_deep']:6.3f} {p['dice_deep']:6.3f} {p['iou_dust']:6.3f} {p['recall_deep']:8.3f} "
                f"{p['recall_3_10pct']:8.3f} {p['precision']:6.3f} {p['f1']:6.3f} "
                f"{p['dark_features_masked']:6.3f} {p['seconds_per_mp']:7.2f}")
    return table


# --------------------------------------------------------------------------- cloud pairs
def _read_pair(reference_path: Path, cloud_path: Path) -> tuple[np.ndarray, np.ndarray]:
    from aiflat_local.errors import InputError
    from aiflat_local.io import read_image, read_mask

    reference, _ = read_image(reference_path)
    if reference.ndim == 3:
        reference = reference.mean(axis=2)
    cloud = read_mask(cloud_path)  # soft JPEG edges: >= 128 is dust
    if cloud.shape != reference.shape:
        raise InputError(f"{cloud_path} is {cloud.shape[1]} x {cloud.shape[0]} but {reference_path} is "
                         f"{reference.shape[1]} x {reference.shape[0]}")
    return reference.astype(np.float32), cloud


def run_pairs(maskers: list[Masker], pairs: list[tuple[Path, Path]], mask_files: list[Path],
              sheet_dir: Path | None, crop: tuple[slice, slice] | None = None, log=print) -> list[dict]:
    from aiflat_local.io import read_mask
    from aiflat_local.metrics import compare_masks

    out = []
    for reference_path, cloud_path in pairs:
        reference, cloud = _read_pair(reference_path, cloud_path)
        if crop is not None:
            reference, cloud = reference[crop], cloud[crop]
        mp = reference.size / 1e6
        masks: dict[str, np.ndarray] = {}
        entry: dict[str, Any] = {"reference": str(reference_path), "cloud_mask": str(cloud_path),
                                 "shape": list(reference.shape), "maskers": {}}
        for m in (m for m in maskers if m.single_image):
            masks[m.label], seconds = _timed(lambda: m.run(reference, None))
            entry["maskers"][m.label] = {**compare_masks(masks[m.label], cloud, min_area=9, tolerance_px=2),
                                         "seconds": round(seconds, 3), "seconds_per_mp": seconds / mp}
        for path in mask_files:
            mask = read_mask(path)
            if crop is not None:
                mask = mask[crop]
            if mask.shape != cloud.shape:
                log(f"  {path}: {mask.shape[1]} x {mask.shape[0]}, not the size of {reference_path}; not scored")
                continue
            label = f"file:{Path(path).name}"
            masks[label] = mask
            entry["maskers"][label] = {**compare_masks(mask, cloud, min_area=9, tolerance_px=2), "path": str(path)}
        log(f"\n{reference_path.name} against {cloud_path.name} ({reference.shape[1]} x {reference.shape[0]}, "
            f"{int(cloud.sum())} cloud pixels)")
        log(f"  {'masker':22s} {'IoU':>6s} {'Dice':>6s} {'recall':>12s} {'prec':>6s} {'F1':>6s} {'s/MP':>7s}")
        for label, r in entry["maskers"].items():
            spm = f"{r['seconds_per_mp']:7.2f}" if "seconds_per_mp" in r else f"{'-':>7s}"
            log(f"  {label:22s} {r['pixel_iou']:6.3f} {r['dice']:6.3f} "
                f"{r['object_n_ref_found']:4d}/{r['object_n_ref']:<3d}{r['object_recall']:5.2f} "
                f"{r['object_precision']:6.3f} {r['object_f1']:6.3f} {spm}")
        # disagreements: cloud objects each masker missed, masker objects (>= 9 px) the cloud does not have
        items, listed = [], {}
        for label, mask in masks.items():
            extra, missed = disagreements(mask, cloud, None)
            listed[label] = {"not_in_cloud": len(extra), "cloud_missed": len(missed),
                             "cloud_missed_at": [[o["y"], o["x"], o["area"]] for o in missed],
                             "largest_not_in_cloud_at": [[o["y"], o["x"], o["area"]] for o in extra[:10]]}
            items += [(f"{label} missed", o) for o in missed] + [(f"{label} only", o) for o in extra[:12]]
        entry["disagreements"] = listed
        if sheet_dir is not None and items:
            items = _dedupe(items)
            path = Path(sheet_dir) / f"masks_{Path(reference_path).stem}.png"
            entry["contact_sheet"] = str(contact_sheet(reference, {"cloud": cloud, **masks}, items, path))
            log(f"  contact sheet ({len(items)} crops, outlines: cloud red, dustnet green, classical blue, "
                f"others yellow): {entry['contact_sheet']}")
        out.append(entry)
    return out


def _dedupe(items: list[tuple[str, dict]], radius: int = 24) -> list[tuple[str, dict]]:
    """One crop per place: items within *radius* px of an earlier one are merged into its title."""
    kept: list[tuple[str, dict]] = []
    for title, obj in items:
        for i, (t, o) in enumerate(kept):
            if abs(o["y"] - obj["y"]) <= radius and abs(o["x"] - obj["x"]) <= radius:
                kept[i] = (t if title in t else f"{t}; {title}", o)
                break
        else:
            kept.append((title, obj))
    return kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, action="append", type=Path, metavar=("REFERENCE", "CLOUD_MASK"),
                        help="a reference image and the cloud mask for it (repeatable; default: ../shared/real)")
    parser.add_argument("--mask-file", action="append", type=Path, default=[],
                        help="a mask from elsewhere (255 = dust) scored against every pair of its size")
    parser.add_argument("--maskers", nargs="+", default=None, help="registered maskers (default: all)")
    parser.add_argument("--sam-model", action="append", default=None, help="SAM weights (default: all present)")
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--sheet-dir", type=Path, default=RESULTS / "sheets",
                        help="where the contact sheets go (default benchmarks/results/sheets, not committed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, proves the script runs")
    parser.add_argument("--output", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    crop = None
    pairs = [tuple(p) for p in args.pair] if args.pair else []
    if not args.pair and (DEFAULT_REAL / "median_left.png").is_file():
        pairs = [(DEFAULT_REAL / "median_left.png", DEFAULT_REAL / "cloud_mask_left.png")]
        if args.smoke:  # a corner of the real case with dust in it, to stay fast
            crop = (slice(800, 1000), slice(560, 816))
    if args.smoke:
        args.conditions, args.seeds, args.size, args.frames = ["default", "jpeg75"], [0], [96, 128], 5
        if args.output is not None:
            args.sheet_dir = args.output / "sheets"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    print("maskers:")
    maskers, skipped = build_maskers(args.maskers, args.sam_model)
    print("  " + ", ".join(m.label for m in maskers))
    result: dict[str, Any] = {
        "benchmark": "masks",
        "command": "python benchmarks/masks.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "maskers": {m.label: m.info for m in maskers}, "skipped": skipped,
        "simulator_setup": {"size": args.size, "frames": args.frames, "seeds": args.seeds,
                            "reference": "exact temporal median of the noisy uint16 frames"},
    }
    t0 = time.perf_counter()
    result["pairs"] = run_pairs(maskers, pairs, args.mask_file, args.sheet_dir, crop) if pairs else []
    if not pairs:
        print(f"\nno cloud pairs ({DEFAULT_REAL} not found and no --pair given)")
    result["simulator"] = run_simulator(maskers, args.conditions, args.seeds, tuple(args.size), args.frames)
    result["simulator_all_conditions"] = {
        m.label: pool([result["simulator"][c]["maskers"][m.label]["pooled"] for c in args.conditions])
        for m in maskers}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_results("masks", result, args.output, smoke=args.smoke)
    print(f"\nwrote {path} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

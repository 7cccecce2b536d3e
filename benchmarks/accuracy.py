"""Pipeline accuracy on the simulator: mask recall, dark-feature leakage, flat error, residual dust.

For each seed: simulate a dusty video, run the whole pipeline (`aiflat_local.pipeline.run`, the
same code as `aiflat-local run`) with each inpainter, and score against the ground truth with
`aiflat_local.demo.score_run`. Prints a table and writes `benchmarks/results/accuracy.json`.

    python benchmarks/accuracy.py                 # 5 seeds, 480 x 640, 32 frames
    python benchmarks/accuracy.py --smoke --output /tmp/x   # tiny, seconds (CI)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--inpainters", nargs="+", default=["harmonic", "biharmonic"])
    parser.add_argument("--flat-methods", nargs="+", default=["auto", "inpaint"],
                        help="auto = the motion flat when the frames move (the default of `run`)")
    parser.add_argument("--obstruction", type=float, default=0.3, help="central obstruction (donuts)")
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, proves the script runs")
    parser.add_argument("--output", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.size, args.frames = [0], [96, 128], 6

    from aiflat_local.demo import score_run
    from aiflat_local.pipeline import RunOptions, run
    from aiflat_local.synth import SimConfig, simulate

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for obstruction in sorted({0.0, args.obstruction}):
                config = SimConfig(height=args.size[0], width=args.size[1], n_frames=args.frames, seed=seed,
                                   central_obstruction=obstruction)
                sim = simulate(Path(work) / f"sim{seed}_{obstruction}", config)
                for method, inpainter in [(m, i) for m in args.flat_methods for i in args.inpainters]:
                    if method != "inpaint" and inpainter != args.inpainters[0]:
                        continue  # the motion route uses the inpainter only outside the motion support
                    out = Path(work) / f"run{seed}_{obstruction}_{method}_{inpainter}"
                    t = time.perf_counter()
                    run(sim.video, out, RunOptions(inpainter=inpainter, flat_method=method, progress=False))
                    elapsed = time.perf_counter() - t
                    score = score_run(out, sim.directory)
                    name = f"{method}/{inpainter}"
                    rows.append({"seed": seed, "obstruction": obstruction, "route": name,
                                 "time_s": round(elapsed, 2), **score})
                    print(f"seed {seed} obstr {obstruction:.1f} {name:18s} "
                          f"recall>10% {score['deep_dust_recall']:.3f}  recall3-10% {score['medium_dust_recall_3_10pct']:.3f}  "
                          f"leak {score['dark_feature_leakage']:.3f}  flat err med {100 * score['deep_dust_flat_error_median']:.2f}% "
                          f"p90 {100 * score['deep_dust_flat_error_p90']:.2f}%  residual med {100 * score['deep_dust_residual_median']:.2f}% "
                          f"max {100 * score['deep_dust_residual_max']:.2f}%  exact-1 {score['fraction_flat_exactly_one']:.3f}  "
                          f"{elapsed:.1f}s", flush=True)

    summary = {}
    for route in dict.fromkeys(r["route"] for r in rows):
        sel = [r for r in rows if r["route"] == route]
        summary[route] = {
            k: float(np.mean([r[k] for r in sel]))
            for k in ("deep_dust_recall", "medium_dust_recall_3_10pct", "dark_feature_leakage",
                      "deep_dust_flat_error_median", "deep_dust_flat_error_p90", "deep_dust_residual_median",
                      "deep_dust_residual_max", "fraction_flat_exactly_one")
        }
        summary[route]["min_deep_dust_recall"] = float(min(r["deep_dust_recall"] for r in sel))
        summary[route]["max_deep_dust_residual_median"] = float(max(r["deep_dust_residual_median"] for r in sel))
        summary[route]["max_deep_dust_flat_error_median"] = float(max(r["deep_dust_flat_error_median"] for r in sel))
    print("\nmean over runs:")
    for name, s in summary.items():
        print(f"  {name:10s} " + "  ".join(f"{k} {v:.4f}" for k, v in s.items()))
    result = {"benchmark": "accuracy", "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "config": {"seeds": args.seeds, "size": args.size, "frames": args.frames},
              "rows": rows, "summary": summary}
    path = write_results("accuracy", result, args.output, smoke=args.smoke)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

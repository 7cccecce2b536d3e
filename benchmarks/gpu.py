"""The GPU section: the CUDA (and half-precision) paths against the CPU, side by side on one video.

Runs when CUDA is present (without it, a full run says so and writes nothing,
so committed GPU results are never replaced by an empty run). On a simulated
1920 x 1200 16-bit video with known flat (``aiflat_local.synth.simulate``) it
measures, for each device:

  (a) the motion flat (``motion.motion_flat``, torch FFTs on CUDA): time, flat
      error in dust deeper than 10 % against the true flat, and the largest
      difference from the CPU's gain;
  (b) the dustnet masker on the temporal median, float32 and (CUDA) float16:
      time (best of 3, model loaded), pixel IoU with the CPU float32 mask;
  (c) end to end, ``aiflat-local run VIDEO -o OUT --device D``: wall time and
      peak RSS (a subprocess each).

::

    python benchmarks/gpu.py                   # needs CUDA; ~2 min on a GPU machine
    python benchmarks/gpu.py --devices cpu     # the same measurements on the CPU only
    python benchmarks/gpu.py --smoke --output /tmp/x   # tiny, CPU only (CI)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_info, write_results  # noqa: E402


def _best_of(fn, repeat: int) -> tuple[object, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                        help="default: cpu and cuda (needs CUDA)")
    parser.add_argument("--size", type=int, nargs=2, default=[1200, 1920], metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=96, help="frames in the simulated video")
    parser.add_argument("--motion-frames", type=int, default=48)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny video, CPU only: proves the script runs")
    parser.add_argument("--output", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if args.smoke:
        args.size, args.frames, args.motion_frames, args.devices = [96, 128], 8, 8, args.devices or ["cpu"]
    devices = args.devices or (["cpu", "cuda"] if cuda else [])
    if not devices:
        print("no CUDA device: the GPU section is skipped (nothing written). "
              "`--devices cpu` runs the same measurements on the CPU.")
        return 0
    if "cuda" in devices and not cuda:
        raise SystemExit("--devices cuda: torch sees no CUDA device")

    from aiflat_local.io import read_image
    from aiflat_local.io.ser import SerReader
    from aiflat_local.masks import MASKERS
    from aiflat_local.metrics import flat_error, pixel_iou
    from aiflat_local.motion import motion_flat
    from aiflat_local.reference import temporal_median
    from aiflat_local.synth import SimConfig, simulate
    from speed import run_child

    result: dict = {"benchmark": "gpu",
                    "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "machine": {**machine_info(), "torch": torch.__version__,
                                "cuda_device": torch.cuda.get_device_name(0) if cuda else None},
                    "config": {"size": args.size, "frames": args.frames, "motion_frames": args.motion_frames,
                               "devices": devices}}
    with tempfile.TemporaryDirectory(prefix="aiflat-gpu-") as tmp:
        t = time.perf_counter()
        paths = simulate(Path(tmp) / "sim", SimConfig(height=args.size[0], width=args.size[1],
                                                      n_frames=args.frames, seed=0))
        print(f"simulated {args.size[1]} x {args.size[0]} x {args.frames} in {time.perf_counter() - t:.1f} s")
        true_flat, _ = read_image(paths.true_flat)
        import json

        truth = json.loads(Path(paths.truth).read_text())
        deep_labels = [o["label"] for o in truth["objects"] if o["depth"] > 0.10]
        labels, _ = read_image(paths.dust_labels)
        deep = np.isin(labels.astype(np.int64), deep_labels)

        # (a) motion flat
        motion_rows, gains = [], {}
        for device in devices:
            with SerReader(paths.video) as reader:
                mf, seconds = _best_of(lambda: motion_flat(reader, max_frames=args.motion_frames, device=device), 1)
            gains[device] = mf.gain
            err = flat_error(mf.gain, true_flat, deep)
            pct = {k: None if err[k] is None else round(100 * err[k], 3) for k in ("median", "p90")}
            motion_rows.append([device, round(seconds, 2), pct["median"], pct["p90"]])
            print(f"motion flat on {device}: {seconds:.2f} s, deep-dust error median {pct['median']} %")

        for row in motion_rows:  # against the CPU's gain, when the CPU ran
            row.append(f"{np.abs(gains[row[0]] - gains['cpu']).max():.2e}" if "cpu" in gains and row[0] != "cpu" else "-")

        # (b) dustnet
        with SerReader(paths.video) as reader:
            reference = temporal_median(reader)
        net_rows, masks = [], {}
        for device in devices:
            for dtype in (("float32", "float16") if device == "cuda" else ("float32",)):
                masker = MASKERS.create("dustnet", device=device, dtype=dtype)
                masker(reference[:64, :64])  # warm-up
                out, seconds = _best_of(lambda: masker(reference).binary, 1 if args.smoke else 3)
                masks[(device, dtype)] = out
                net_rows.append([f"{device} {dtype}", round(seconds, 3), int(out.sum())])
                print(f"dustnet {device} {dtype}: {seconds:.3f} s")
        cpu_mask = masks.get(("cpu", "float32"))
        for row, key in zip(net_rows, masks):  # agreement with the CPU float32 mask, when the CPU ran
            row.insert(2, round(pixel_iou(masks[key], cpu_mask), 4) if cpu_mask is not None else "-")

        # (c) end to end
        e2e_rows = []
        for device in ([] if args.skip_e2e else devices):
            cmd = [sys.executable, "-c", "import sys; from aiflat_local.cli import main; sys.exit(main(sys.argv[1:]))",
                   "run", str(paths.video), "-o", str(Path(tmp) / f"run_{device}"), "--device", device, "--quiet"]
            info = run_child(cmd, timeout=1800)
            if info["returncode"] != 0:
                raise SystemExit(f"run --device {device} failed:\n{info.get('stderr_tail', '')}")
            peak = info.get("peak_rss_mb")
            e2e_rows.append([device, round(info["wall_s"], 1), round(peak) if peak else "-"])
            print(f"aiflat-local run --device {device}: {info['wall_s']:.1f} s")

    h, w = args.size
    result["tables"] = [
        {"title": f"(a) motion flat, {w} x {h}, {args.motion_frames} of {args.frames} frames",
         "columns": ["device", "time s", "deep err median %", "deep err p90 %", "max |gain - cpu gain|"],
         "rows": motion_rows},
        {"title": f"(b) dustnet on the {w} x {h} median", "columns": ["device", "time s", "IoU with cpu", "mask px"],
         "rows": net_rows},
    ]
    if e2e_rows:
        result["tables"].append({"title": f"(c) aiflat-local run, {w} x {h} x {args.frames} frames",
                                 "columns": ["device", "wall s", "peak RSS MiB"], "rows": e2e_rows})
    path = write_results("gpu", result, args.output, smoke=args.smoke)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

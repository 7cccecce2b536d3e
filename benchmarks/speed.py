"""Speed and peak memory: temporal median and calibration against the obvious ways.

Generates a 16-bit SER per frame count (default 1920 x 1200, 200 and 1000
frames: 0.9 and 4.4 GiB; a textured solar field with fixed dust, fixed seed,
streamed with SerWriter) and measures, side by side in one run, each in its own
subprocess so that peak RSS is that task's alone:

  (a) the original cloud tool's way: every frame read into a Python list,
      ``np.median(np.array(frames), axis=0)``, cast to float32;
  (b) ``aiflat_local.reference.temporal_median`` (default settings);
  (c) ``aiflat_local.calibrate.calibrate_ser`` of every frame, with a dust flat
      (1.0 outside small shadows, the flats this tool makes) and with a dense
      flat (every pixel different from 1.0, the worst case);
  (d) a plain ``shutil.copyfile`` of the same SER, the floor for (c);
  (e) end to end, ``aiflat-local run`` (skipped with a note if the CLI is absent).

(a) and (b) results are compared bit for bit. The SER sits in the page cache
(it was just written), so (a)-(d) measure computation and writing, not disk
reads. (c) and (d) are repeated alternately (``--repeat``) with ``os.sync()``
before each run, because write-back makes single write timings noisy; the
table shows the median and the JSON keeps every run.

    python benchmarks/speed.py                       # full size, 200 and 1000 frames: ~10 min, ~14 GB RAM for (a)
    python benchmarks/speed.py --frames 200          # the 200-frame case only, about a minute
    python benchmarks/speed.py --smoke --output /tmp/x   # 64 x 80 x 10 and 20 frames, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the package, when it is not installed
from _common import machine_info, write_results  # noqa: E402

SEED = 20240607
TARGET_SPEEDUP = 4.0  # reference vs (a)
TARGET_MEMORY_FRACTION = 0.2  # reference peak RSS vs (a)


# ----------------------------------------------------------------------------- data
def _gaussian_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-rms Gaussian random field with correlation length ~sigma px (FFT filtered)."""
    noise = rng.standard_normal(shape).astype(np.float32)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2)).astype(np.float32)
    field = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=shape).astype(np.float32)
    field -= field.mean()
    field /= field.std() + 1e-12
    return field


def dust_flat(height: int, width: int, seed: int = SEED) -> np.ndarray:
    """A flat that is exactly 1.0 except in ~a dozen dust shadows (donuts with a bright rim)."""
    rng = np.random.default_rng(seed + 1)
    flat = np.ones((height, width), np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    n = max(2, int(12 * height * width / (1920 * 1200)))
    for _ in range(n):
        r = float(rng.uniform(0.02, 0.05) * min(height, width))
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        y0, y1 = int(max(0, cy - 1.3 * r)), int(min(height, cy + 1.3 * r + 1))
        x0, x1 = int(max(0, cx - 1.3 * r)), int(min(width, cx + 1.3 * r + 1))
        d = np.hypot(yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx) / r
        depth = rng.uniform(0.05, 0.4)
        shadow = 1 - depth * np.exp(-((d - 0.5) / 0.25) ** 2) * (d < 1.05)
        rim = 1 + 0.02 * np.exp(-((d - 1.1) / 0.06) ** 2) * (d < 1.25)
        g = np.where(d < 1.25, shadow * rim, 1.0).astype(np.float32)
        flat[y0:y1, x0:x1] *= g
    return flat


def dense_flat(height: int, width: int) -> np.ndarray:
    """Vignetting 0.85-1.0 plus 0.5 % pixel noise: no pixel is exactly 1.0."""
    yy, xx = np.mgrid[0:height, 0:width]
    r2 = ((yy - height / 2) / height) ** 2 + ((xx - width / 2) / width) ** 2
    rng = np.random.default_rng(SEED + 2)
    flat = (0.99 - 0.3 * r2) * (1 + 0.005 * rng.standard_normal((height, width)))
    return flat.astype(np.float32)


def write_video(path: Path, height: int, width: int, n_frames: int) -> float:
    """Stream a textured dusty solar field into a uint16 SER; returns seconds taken."""
    from aiflat_local.io.ser import SerWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(SEED)
    margin = 8
    canvas = (height + 2 * margin, width + 2 * margin)
    texture = 0.6 * _gaussian_field(rng, canvas, 3.0) + 0.4 * _gaussian_field(rng, canvas, 12.0)
    yy, xx = np.mgrid[0 : canvas[0], 0 : canvas[1]].astype(np.float32)
    r = np.hypot(yy - canvas[0] * 0.55, xx - canvas[1] * 0.45) / (1.6 * max(canvas))
    limb = 1 - 0.6 * (1 - np.sqrt(np.clip(1 - r**2, 0, 1)))  # limb darkening
    sun = (28000 * limb * (1 + 0.06 * texture)).astype(np.float32)
    flat = dust_flat(height, width)
    timestamps = 638_000_000_000_000_000 + np.arange(n_frames, dtype=np.int64) * 100_000
    with SerWriter(path, width=width, height=height, dtype=np.uint16, pixel_depth=12,
                   timestamps=timestamps) as writer:
        for _ in range(n_frames):
            dy, dx = rng.integers(0, 2 * margin + 1, size=2)
            frame = sun[dy : dy + height, dx : dx + width] * flat
            frame += rng.normal(0.0, 120.0, frame.shape).astype(np.float32)
            np.clip(frame, 0, 65535, out=frame)
            writer.write(np.rint(frame).astype(np.uint16))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- child tasks
def _self_peak_mb() -> float | None:
    """This process's own peak RSS in MiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this
    process's own memory map. (``ru_maxrss`` is not used there: it carries over
    the RSS of the parent at fork/exec.) Elsewhere ``ru_maxrss`` or psutil.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / 2**20
        except Exception:  # noqa: BLE001 - best effort on exotic platforms
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def child(task: str, workdir: Path, workers: int, max_memory_mb: float) -> dict:
    """Run one task in this (fresh) process; the parent reads our JSON line."""
    import aiflat_local.calibrate as calibrate
    import aiflat_local.reference as reference
    from aiflat_local.io.ser import HEADER_SIZE, SerReader

    video = workdir / "video.ser"
    info: dict = {"task": task, "rss_after_imports_mb": _self_peak_mb()}
    t0 = time.perf_counter()
    if task == "idle":
        pass
    elif task == "generate":
        h, w, n = (int(v) for v in os.environ["AIFLAT_SPEED_VIDEO"].split("x"))
        write_video(video, h, w, n)
    elif task == "numpy_median":
        # The original tool's way: read every frame into a list, stack, median.
        with SerReader(video) as r:
            h, w, n, fb = r.height, r.width, r.n_frames, r.header.frame_bytes
        frames = []
        with open(video, "rb") as fh:
            for i in range(n):
                fh.seek(HEADER_SIZE + i * fb)
                frames.append(np.fromfile(fh, dtype="<u2", count=h * w).reshape(h, w))
        result = np.median(np.array(frames), axis=0).astype(np.float32)
    elif task == "temporal_median":
        with SerReader(video) as r:
            result = reference.temporal_median(r, workers=workers, max_memory_mb=max_memory_mb)
    elif task in ("calibrate_dust", "calibrate_dense"):
        with SerReader(video) as r:
            h, w = r.height, r.width
        flat = dust_flat(h, w) if task == "calibrate_dust" else dense_flat(h, w)
        t0 = time.perf_counter()  # flat construction is not part of calibration
        stats = calibrate.calibrate_ser(video, flat, workdir / f"{task}.ser")
        info["stats"] = stats.to_dict()
    elif task == "copy":
        shutil.copyfile(video, workdir / "copy.ser")
    else:
        raise SystemExit(f"unknown task {task}")
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss_self_mb"] = _self_peak_mb()
    if task in ("numpy_median", "temporal_median"):
        np.save(workdir / f"{task}.npy", result)
    return info


def _reap_with_rusage(proc: subprocess.Popen, timeout: float | None) -> tuple[bytes, bytes, float]:
    """Collect output, then reap with ``os.wait4`` to get this child's own peak RSS (MiB)."""
    import threading

    chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: chunks.__setitem__(k, s.read()))
               for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            break
        time.sleep(0.02)
    for t in readers:
        t.join()
    peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    return chunks.get("out", b""), chunks.get("err", b""), peak


def run_child(args: list[str], timeout: float | None = None) -> dict:
    """Run a subprocess; return its last JSON line (if any), wall seconds and peak RSS."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak_mb = None
    if hasattr(os, "wait4"):
        out, err, peak_mb = _reap_with_rusage(proc, timeout)
    else:  # no wait4 (Windows): the child reports its own peak
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    wall = time.perf_counter() - t0
    info: dict = {}
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            info = json.loads(line)
            break
    info.update({"returncode": proc.returncode, "wall_s": wall})
    # The child's own high-water mark when it reported one (exact); otherwise
    # wait4's ru_maxrss, which also counts the parent's RSS at fork time.
    info["peak_rss_wait4_mb"] = peak_mb
    info["peak_rss_mb"] = info.get("peak_rss_self_mb") or peak_mb
    if proc.returncode != 0:
        info["stderr_tail"] = err.decode(errors="replace")[-2000:]
    return info


def _task(task: str, workdir: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", task, "--workdir", str(workdir),
           "--workers", str(args.workers), "--max-memory-mb", str(args.max_memory_mb)]
    _sync()  # every task starts with no write-back pending
    info = run_child(cmd)
    if info["returncode"] != 0:
        raise SystemExit(f"task {task} failed:\n{info.get('stderr_tail', '')}")
    return info


def _sync() -> None:
    if hasattr(os, "sync"):
        os.sync()


# ----------------------------------------------------------------------------- main
def measure_case(height: int, width: int, n_frames: int, args) -> dict:
    """Generate one SER of *n_frames* and measure (a)-(e) on it; the case's config, results, ratios, table."""
    base = args.workdir
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="aiflat-speed-", dir=base))
    try:
        video = workdir / "video.ser"
        # Generated in a child too, so that this process stays small: a forked
        # child's ru_maxrss starts at its parent's RSS.
        os.environ["AIFLAT_SPEED_VIDEO"] = f"{height}x{width}x{n_frames}"
        gen_s = _task("generate", workdir, args)["seconds"]
        size_mb = video.stat().st_size / 2**20
        print(f"video: {width} x {height} x {n_frames} uint16, {size_mb:.0f} MiB, "
              f"written in {gen_s:.1f} s ({workdir})", flush=True)

        results: dict[str, dict] = {}
        results["idle"] = _task("idle", workdir, args)
        for task in ("numpy_median", "temporal_median"):
            results[task] = _task(task, workdir, args)
            print(f"  {task}: {results[task]['seconds']:.2f} s", flush=True)
        a = np.load(workdir / "numpy_median.npy")
        b = np.load(workdir / "temporal_median.npy")
        identical = bool(a.dtype == b.dtype and np.array_equal(a, b))
        (workdir / "numpy_median.npy").unlink()
        (workdir / "temporal_median.npy").unlink()

        runs: dict[str, list[dict]] = {"copy": [], "calibrate_dust": [], "calibrate_dense": []}
        for _ in range(args.repeat):
            for task in runs:
                info = _task(task, workdir, args)
                runs[task].append(info)
                out = workdir / ("copy.ser" if task == "copy" else f"{task}.ser")
                out.unlink()
                print(f"  {task}: {info['seconds']:.2f} s", flush=True)
        for task, lst in runs.items():
            results[task] = {
                "seconds": statistics.median(r["seconds"] for r in lst),
                "seconds_min": min(r["seconds"] for r in lst),
                "seconds_all": [r["seconds"] for r in lst],
                "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in lst),
                "stats": lst[-1].get("stats"),
            }

        e2e: dict = {}
        try:
            import importlib.util

            has_cli = importlib.util.find_spec("aiflat_local.cli") is not None
        except ImportError:
            has_cli = False
        if args.skip_e2e:
            e2e = {"skipped": "--skip-e2e"}
        elif not has_cli:
            e2e = {"skipped": "aiflat_local.cli not found"}
        else:
            _sync()
            cmd = [sys.executable, "-c", "import sys; from aiflat_local.cli import main; sys.exit(main(sys.argv[1:]))",
                   "run", str(video), "-o", str(workdir / "run"), "--quiet"]
            info = run_child(cmd, timeout=args.e2e_timeout)
            e2e = {"seconds": info["wall_s"], "peak_rss_mb": info["peak_rss_mb"],
                   "returncode": info["returncode"], "command": "aiflat-local run VIDEO -o OUT --quiet"}
            if info["returncode"] != 0:
                e2e["skipped"] = f"failed (exit {info['returncode']}): " + info.get("stderr_tail", "")[-400:]
            report = workdir / "run" / "report.json"
            if report.exists():
                e2e["timings_s"] = json.loads(report.read_text()).get("timings_s")
            print(f"  aiflat-local run: {info['wall_s']:.1f} s", flush=True)
        results["e2e"] = e2e
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    a, b = results["numpy_median"], results["temporal_median"]
    c, cd, d = results["calibrate_dust"], results["calibrate_dense"], results["copy"]
    idle = results["idle"]["peak_rss_mb"]
    speedup = a["seconds"] / b["seconds"]
    mem_fraction = b["peak_rss_mb"] / a["peak_rss_mb"]
    ratios = {
        "median_speedup_vs_numpy": speedup,
        "median_peak_rss_fraction_of_numpy": mem_fraction,
        "median_net_rss_fraction_of_numpy": (b["peak_rss_mb"] - idle) / max(a["peak_rss_mb"] - idle, 1e-9),
        "calibrate_dust_time_vs_copy": c["seconds"] / d["seconds"],
        "calibrate_dense_time_vs_copy": cd["seconds"] / d["seconds"],
    }
    rows = [
        ("(a) np.median of a list of frames", a, ""),
        ("(b) temporal_median", b, f"{speedup:.1f}x faster than (a), {100 * mem_fraction:.0f} % of its peak RSS"),
        ("(c) calibrate_ser, dust flat", c, f"{ratios['calibrate_dust_time_vs_copy']:.2f}x the copy time"),
        ("(c') calibrate_ser, dense flat", cd, f"{ratios['calibrate_dense_time_vs_copy']:.2f}x the copy time"),
        ("(d) shutil.copyfile", d, ""),
    ]
    if "seconds" in results["e2e"] and "skipped" not in results["e2e"]:
        rows.append(("(e) aiflat-local run (wall, incl. start-up)", results["e2e"], ""))
    print(f"\n{width} x {height} x {n_frames} frames uint16 ({size_mb:.0f} MiB), "
          f"{os.cpu_count()} CPUs; interpreter + imports alone: {idle:.0f} MiB peak RSS")
    print(f"{'task':44s} {'time s':>8s} {'peak RSS MiB':>13s}  note")
    for name, r, note in rows:
        print(f"{name:44s} {r['seconds']:8.2f} {r['peak_rss_mb']:13.0f}  {note}")
    if "skipped" in results["e2e"]:
        print(f"(e) aiflat-local run: skipped ({results['e2e']['skipped']})")
    print(f"(a) and (b) bit-identical: {identical}")
    targets_met = speedup >= TARGET_SPEEDUP and mem_fraction <= TARGET_MEMORY_FRACTION
    if not args.smoke:
        print(f"targets (>= {TARGET_SPEEDUP:g}x faster, <= {TARGET_MEMORY_FRACTION:.0%} memory): "
              f"{'met' if targets_met else 'NOT met'}")

    return {
        "config": {"height": height, "width": width, "frames": n_frames, "dtype": "uint16",
                   "size_mib": size_mb, "repeat": args.repeat, "workers": args.workers,
                   "max_memory_mb": args.max_memory_mb, "seed": SEED, "generation_s": gen_s,
                   "note": "input SER in the page cache; (c)/(d) medians of alternating runs after os.sync()"},
        "results": results,
        "ratios": ratios,
        "bit_identical": identical,
        "targets": {"speedup": TARGET_SPEEDUP, "memory_fraction": TARGET_MEMORY_FRACTION,
                    "met": targets_met if not args.smoke else None},
        "table": {
            "title": f"{width} x {height} x {n_frames} frames uint16 ({size_mb:.0f} MiB)",
            "columns": ["task", "time s", "peak RSS MiB", "note"],
            "rows": [[name, round(r["seconds"], 2), round(r["peak_rss_mb"]), note] for name, r, note in rows],
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[200, 1000], help="frame counts, one SER each")
    parser.add_argument("--size", type=int, nargs=2, default=[1200, 1920], metavar=("H", "W"))
    parser.add_argument("--repeat", type=int, default=5, help="runs of each write task (c, d)")
    parser.add_argument("--workers", type=int, default=2, help="temporal_median workers")
    parser.add_argument("--max-memory-mb", type=float, default=256, help="temporal_median budget")
    parser.add_argument("--workdir", type=Path, default=None, help="where the SER goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--skip-e2e", action="store_true", help="skip (e), aiflat-local run")
    parser.add_argument("--e2e-timeout", type=float, default=1800, help="seconds allowed for (e)")
    parser.add_argument("--smoke", action="store_true", help="64 x 80 x 10 and 20 frames: proves the script runs")
    parser.add_argument("--output", type=Path, default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.workers, args.max_memory_mb)), flush=True)
        return 0
    if args.smoke:
        args.size, args.frames, args.repeat = [64, 80], [10, 20], 1
    height, width = args.size
    cases = [measure_case(height, width, n, args) for n in args.frames]
    result = {
        "benchmark": "speed",
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "cases": cases,
        "tables": [c.pop("table") for c in cases],
    }
    path = write_results("speed", result, args.output, smoke=args.smoke)
    print(f"wrote {path}")
    return 0 if all(c["bit_identical"] for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())

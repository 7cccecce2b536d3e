"""Run every benchmark script, then rebuild benchmarks/README.md from benchmarks/results/*.json.

    python -m benchmarks            # all scripts at their default (full) sizes, CPU; GPU parts when CUDA is present
    python -m benchmarks --smoke    # tiny inputs, results under benchmarks/results/smoke (what CI runs)
    python -m benchmarks --only speed accuracy
    python -m benchmarks --table    # only rebuild README.md from the committed results
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["speed", "accuracy", "flats", "masks", "dustnet", "sam", "diffusion", "gpu"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, choices=SCRIPTS)
    parser.add_argument("--table", action="store_true", help="only rebuild README.md")
    args = parser.parse_args(argv)
    failed = []
    if not args.table:
        for name in args.only or SCRIPTS:
            script = HERE / f"{name}.py"
            if not script.exists():
                continue
            cmd = [sys.executable, str(script)] + (["--smoke"] if args.smoke else [])
            print(f"== {' '.join(cmd[1:])}", flush=True)
            t = time.perf_counter()
            if subprocess.run(cmd).returncode != 0:
                failed.append(name)
            print(f"== {name}: {time.perf_counter() - t:.1f} s", flush=True)
    if not args.smoke:
        from benchmarks.tables import write_readme

        print(f"wrote {write_readme()}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared helpers of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    import numpy
    import scipy

    import aiflat_local

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "aiflat_local": aiflat_local.__version__,
    }
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_kb"] = int(fh.readline().split()[1])
    except OSError:
        pass
    return info


def write_results(name: str, result: dict, output: Path | None, *, smoke: bool) -> Path:
    """Write ``name.json`` into *output* (default ``benchmarks/results``; smoke runs never overwrite it)."""
    directory = Path(output) if output else RESULTS
    if smoke and output is None:
        directory = RESULTS / "smoke"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)
    return path

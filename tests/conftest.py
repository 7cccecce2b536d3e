import os
from pathlib import Path

import numpy as np
import pytest

# Loading code must never reach a model hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def small_video(tmp_path_factory):
    """A seeded 96 x 128, 9-frame simulated dusty SER with its ground truth (written once)."""
    from aiflat_local.synth import SimConfig, simulate

    out = tmp_path_factory.mktemp("sim")
    config = SimConfig(height=96, width=128, n_frames=9, seed=3, n_dust=8, n_sunspots=1, n_pores=2)
    return simulate(out, config)


@pytest.fixture
def readonly_location(tmp_path):
    """A directory path that cannot be created or written (root ignores chmod, so use /sys then)."""
    if os.geteuid() == 0:
        yield Path("/sys/aiflat-local-test-output")
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    yield ro / "out"
    ro.chmod(0o755)


def run_cli(*args):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    import contextlib
    import io

    from aiflat_local.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cli():
    return run_cli


def snapshot(directory: Path) -> dict:
    """Names and bytes of every file below *directory* (to prove nothing changed)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def rng():
    return np.random.default_rng(12345)

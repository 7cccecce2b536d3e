"""Write-to-temporary-then-rename, so an output appears only when complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputError


def check_writable_dir(directory: Path) -> None:
    """Raise :class:`OutputError` unless *directory* exists (or can be made) and is writable."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"output location {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output directory {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {directory} is not writable")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, protect: tuple = ()) -> Iterator[Path]:
    """Yield a temporary path beside *path*; rename it onto *path* on success.

    On any exception the temporary file is removed and *path* is left as it
    was. ``protect`` lists input paths that must never be overwritten.
    """
    path = Path(path)
    for p in protect:
        try:
            if Path(p).resolve() == path.resolve():
                raise OutputError(f"refusing to overwrite the input file {path}")
        except OSError:
            pass
    if path.exists() and path.is_dir():
        raise OutputError(f"output path {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    check_writable_dir(parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write in {parent}: {exc.strerror}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 files; give outputs the usual permissions (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise

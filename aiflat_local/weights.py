"""The local model store: what is in ``weights/``, checksums, safe loading. No network, ever.

``weights/manifest.json`` (shipped) lists the models aiflat-local knows: name,
kind, expected files, sha256 where pinned, licence, where to get them on a
connected machine and the exact command. ``weights/imported.json`` (written by
``aiflat-local weights import``) records what a user brought, with the sha256
of every file, so a later ``verify`` catches a corrupted copy.

The store directory is, in order: the ``directory`` argument, ``$AIFLAT_WEIGHTS``,
``./weights`` if it exists, else the ``weights/`` folder beside the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .errors import WeightsError

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def default_directory() -> Path:
    env = os.environ.get("AIFLAT_WEIGHTS")
    if env:
        return Path(env)
    if Path("weights").is_dir():
        return Path("weights")
    return Path(__file__).resolve().parent.parent / "weights"


class WeightStore:
    """The models known to the manifest plus those imported by the user."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory else default_directory()
        self.models: dict[str, dict[str, Any]] = {}
        for fname in ("manifest.json", "imported.json"):
            path = self.directory / fname
            if path.exists():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as exc:
                    raise WeightsError(f"{path}: unreadable weights manifest ({exc})") from None
                for entry in data.get("models", []):
                    self.models[entry["name"]] = {**self.models.get(entry["name"], {}), **entry}

    # -- queries --------------------------------------------------------------
    def entry(self, name: str) -> dict[str, Any]:
        if name not in self.models:
            raise WeightsError(
                f"unknown model {name!r}; known: {', '.join(sorted(self.models)) or 'none'} "
                f"(see `aiflat-local weights list`)"
            )
        return self.models[name]

    def model_path(self, name: str) -> Path:
        return self.directory / self.entry(name)["path"]

    def status(self, name: str) -> str:
        """``present``, ``missing`` or ``incomplete`` (some expected files absent)."""
        entry = self.entry(name)
        base = self.model_path(name)
        files = entry.get("files", {})
        if entry["path"] in files:  # a single-file checkpoint
            return "present" if base.is_file() else "missing"
        found = [f for f in files if (base / f).is_file()]
        if not found:
            return "missing"
        return "present" if len(found) == len(files) else "incomplete"

    def require(self, name: str, *, verify: bool = True) -> Path:
        """Path of a usable model, or one clear :class:`WeightsError` that says how to get it."""
        entry = self.entry(name)
        base = self.model_path(name)
        for rel, expected in entry.get("files", {}).items():
            path = base if rel == entry["path"] else base / rel
            if not path.is_file():
                raise WeightsError(
                    f"model {name!r}: missing file {path}; on a connected machine run "
                    f"`{entry.get('fetch', 'see ' + entry.get('source', 'the manifest'))}` and copy the "
                    f"result into {self.directory} (or `aiflat-local weights import PATH`)"
                )
            if verify and expected:
                actual = sha256_file(path)
                if actual != expected:
                    raise WeightsError(
                        f"model {name!r}: {path} is corrupted or a different version "
                        f"(sha256 {actual[:12]}..., expected {expected[:12]}...); fetch it again with "
                        f"`{entry.get('fetch', '')}`"
                    )
        return base

    def describe(self) -> str:
        """Human-readable table: name, kind, status, licence, and the fetch command for what is missing."""
        lines = [f"weights directory: {self.directory}"]
        for name in sorted(self.models):
            e = self.models[name]
            st = self.status(name)
            lines.append(f"  {name:20s} {e.get('kind', ''):22s} {st:10s} {e.get('licence', '')}")
            if st != "present" and e.get("fetch"):
                lines.append(f"      get it on a connected machine: {e['fetch']}  ({e.get('source', '')})")
        return "\n".join(lines)

    def verify_all(self, log: Callable[[str], None] = print) -> int:
        """Check every present model's pinned checksums; return the number of failures."""
        failures = 0
        for name in sorted(self.models):
            if self.status(name) == "missing":
                continue
            try:
                self.require(name, verify=True)
                log(f"ok       {name}")
            except WeightsError as exc:
                failures += 1
                log(f"FAILED   {exc}")
        return failures

    # -- import ---------------------------------------------------------------
    def import_path(self, source: str | os.PathLike, *, name: str | None = None) -> dict[str, Any]:
        """Copy a checkpoint file or model folder into the store; record sha256 of each file."""
        source = Path(source)
        if not source.exists():
            raise WeightsError(f"{source}: no such file or folder")
        name = name or source.stem if source.is_file() else (name or source.name)
        dest = self.directory / source.name
        if dest.exists():
            raise WeightsError(f"{dest} already exists in the store; remove it first")
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{source.name}.importing"
        if source.is_file():
            shutil.copyfile(source, tmp)
            files = {source.name: sha256_file(tmp)}
        else:
            shutil.copytree(source, tmp)
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        os.replace(tmp, dest)
        kind = self.models.get(name, {}).get("kind") or guess_kind(dest)
        entry = {**self.models.get(name, {}), "name": name, "kind": kind, "path": source.name, "files": files}
        path = self.directory / "imported.json"
        data = json.loads(path.read_text()) if path.exists() else {"format": 1, "models": []}
        data["models"] = [m for m in data["models"] if m["name"] != name] + [entry]
        tmp_json = path.with_suffix(".json.part")
        tmp_json.write_text(json.dumps(data, indent=2))
        os.replace(tmp_json, path)
        self.models[name] = entry
        return entry


def guess_kind(path: Path) -> str:
    """Guess a model's kind from its files (for `weights import`)."""
    if path.is_file():
        return "sam-meta-checkpoint" if path.suffix == ".pth" else "checkpoint"
    if (path / "model_index.json").exists():
        return "diffusers-inpaint"
    cfg = path / "config.json"
    if cfg.exists():
        try:
            model_type = json.loads(cfg.read_text()).get("model_type", "")
        except json.JSONDecodeError:
            model_type = ""
        return f"{model_type}-hf" if model_type else "hf"
    return "unknown"

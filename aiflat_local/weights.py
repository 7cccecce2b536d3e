"""The local model store: what is in ``weights/``, checksums, safe loading. No network, ever.

``weights/manifest.json`` (shipped) lists the models aiflat-local knows: name,
kind, expected files, sha256 where pinned, licence, where to get them on a
connected machine and the exact command. ``weights/imported.json`` (written by
``aiflat-local weights import``) records what a user brought, with the sha256
of every file, so a later ``verify`` catches a corrupted copy.

The store directory is, in order: the ``directory`` argument, ``$AIFLAT_WEIGHTS``,
``./weights`` if it exists, else the ``weights/`` folder beside the package.

Loading rules (what every learned backend goes through):

- :func:`force_offline` is called before transformers/diffusers are used: the
  Hugging Face hub's offline mode is forced in this process, and models are
  loaded with ``local_files_only=True`` from a *directory path*, never a repo id.
- A model is named by a manifest name or given as a path
  (:meth:`WeightStore.resolve`); a missing or corrupted file is one
  :class:`~aiflat_local.errors.WeightsError` that says which file, what was
  expected and how to get it.
- Tensors are read from ``.safetensors`` when there is a choice; a pickled
  checkpoint (``.pth``/``.pt``/``.bin``) is read only with
  ``torch.load(..., weights_only=True)`` and only after its sha256 matched,
  when a checksum is known (:func:`load_state_dict`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import WeightsError

CHUNK = 1 << 20
#: Environment variables that put the Hugging Face libraries offline.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
#: Weight files of a transformers model folder, in order of preference (safetensors first).
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def force_offline() -> None:
    """Put the Hugging Face hub (and transformers/diffusers on top of it) offline in this process.

    Sets ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1`` and
    ``HF_DATASETS_OFFLINE=1`` (plus ``HF_HUB_DISABLE_TELEMETRY=1``), and, when
    ``huggingface_hub`` was already imported (it reads the variables once, at
    import), its ``constants.HF_HUB_OFFLINE`` too. Idempotent; call it before
    any ``from_pretrained``. With it, a request for a file that is not on disk
    fails at once instead of opening a connection.
    """
    for var in OFFLINE_ENV:
        os.environ[var] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


SHIPPED_DIRECTORY = Path(__file__).resolve().parent.parent / "weights"  # the repository's weights/ (dustnet)


def default_directory() -> Path:
    """``$AIFLAT_WEIGHTS``, else ``./weights`` when it exists, else the repository's ``weights/``."""
    env = os.environ.get("AIFLAT_WEIGHTS")
    if env:
        return Path(env)
    if Path("weights").is_dir():
        return Path("weights")
    return SHIPPED_DIRECTORY


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

    def _file_path(self, name: str, rel: str) -> Path:
        entry = self.entry(name)
        base = self.model_path(name)
        return base if rel == entry["path"] else base / rel

    def _check_files(self, name: str, *, verify: bool, hash_unpinned: bool = False) -> dict[str, str]:
        """Check that every expected file of *name* exists (and matches its sha256).

        Returns ``{relative file: sha256}`` for the files that were hashed
        (those with a known checksum when *verify*, and the others too when
        *hash_unpinned*). Raises :class:`WeightsError` naming the file, what
        was expected and how to get it.
        """
        entry = self.entry(name)
        fetch = entry.get("fetch") or f"see {entry.get('source', 'the manifest')}"
        hashes: dict[str, str] = {}
        for rel, expected in entry.get("files", {}).items():
            path = self._file_path(name, rel)
            if not path.is_file():
                raise WeightsError(
                    f"model {name!r}: missing file {path}; on a connected machine run "
                    f"`{fetch}` and copy the result into {self.directory} "
                    f"(or `aiflat-local weights import PATH`)"
                )
            if (verify and expected) or hash_unpinned:
                actual = sha256_file(path)
                hashes[rel] = actual
                if verify and expected and actual != expected:
                    raise WeightsError(
                        f"model {name!r}: {path} is corrupted or a different version "
                        f"(sha256 {actual[:12]}..., expected {expected[:12]}...); fetch it again with "
                        f"`{fetch}`"
                    )
        return hashes

    def require(self, name: str, *, verify: bool = True) -> Path:
        """Path of a usable model, or one clear :class:`WeightsError` that says how to get it."""
        self._check_files(name, verify=verify)
        return self.model_path(name)

    def resolve(self, model: str | os.PathLike, *, verify: bool = True,
                hash_files: bool = True) -> "ResolvedModel":
        """Find a model given as a manifest name or as a path to a file or folder.

        Parameters
        ----------
        model : str or path
            A name known to the store (``weights/manifest.json`` or
            ``imported.json``), or the path of a checkpoint file or a
            transformers model folder. A repository id such as
            ``facebook/sam-vit-base`` is *not* fetched: it must be a local path.
        verify : bool
            Check every pinned or recorded sha256 first (a mismatch is an error).
        hash_files : bool
            Also hash the files without a known checksum, for provenance
            (``ResolvedModel.sha256``). Only the files that will be loaded are
            hashed (config and weights, not every file of a download).

        Returns
        -------
        ResolvedModel

        Raises
        ------
        WeightsError
            Unknown name and no such path; a missing or corrupted file.
        """
        key = os.fspath(model)
        if key in self.models:
            entry = self.models[key]
            hashes = self._check_files(key, verify=verify, hash_unpinned=hash_files)
            path = self.model_path(key)
            return ResolvedModel(name=key, path=path, kind=entry.get("kind") or guess_kind(path),
                                 sha256=hashes, verified=verify, entry=entry)
        path = Path(key).expanduser()
        if not path.exists():
            known = ", ".join(sorted(self.models)) or "none"
            raise WeightsError(
                f"model {key!r} is neither a model of the weights store ({self.directory}: {known}) nor an "
                f"existing file or folder; see `aiflat-local weights list` for what to bring and how"
            )
        for name, entry in self.models.items():  # a path inside the store: use its recorded checksums
            try:
                same = self.model_path(name).resolve() == path.resolve()
            except OSError:
                same = False
            if same:
                return self.resolve(name, verify=verify, hash_files=hash_files)
        files = model_files(path)
        hashes = {rel: sha256_file(path if rel == path.name and path.is_file() else path / rel)
                  for rel in files} if hash_files else {}
        return ResolvedModel(name=str(path), path=path, kind=guess_kind(path), sha256=hashes,
                             verified=False, entry={})

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


def repin(model_dir: str | os.PathLike) -> Path | None:
    """Record the current sha256 of a store model's files in its manifest, after it was rebuilt here.

    *model_dir* is a model folder of a weights store when its parent holds a
    ``manifest.json`` with an entry whose ``path`` is the folder's name (for
    example ``weights/dustnet`` after ``aiflat-local train --out weights/dustnet``):
    the pinned checksums of that entry's files are replaced by the files' own.
    Returns the manifest's path, or None when *model_dir* is not such a folder.
    """
    model_dir = Path(model_dir).resolve()
    manifest = model_dir.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{manifest}: unreadable weights manifest ({exc})") from None
    entries = [e for e in data.get("models", []) if e.get("path") == model_dir.name]
    if not entries:
        return None
    for entry in entries:
        entry["files"] = {rel: sha256_file(model_dir / rel) for rel in entry.get("files", {})}
    tmp = manifest.with_name(manifest.name + ".part")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, manifest)
    return manifest


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
        model_type = _KIND_ALIASES.get(model_type, model_type)
        return f"{model_type}-hf" if model_type else "hf"
    return "unknown"


#: Folder model types that share a manifest kind (the full SAM 3 folder is a ``sam3_video`` model).
_KIND_ALIASES = {"sam3_video": "sam3", "sam3_tracker": "sam3", "sam3_tracker_video": "sam3", "sam2_video": "sam2"}


@dataclass
class ResolvedModel:
    """A model found on disk by :meth:`WeightStore.resolve`.

    Attributes
    ----------
    name : str
        The manifest name, or the path as given.
    path : pathlib.Path
        The checkpoint file or model folder.
    kind : str
        Manifest kind (``sam-hf``, ``sam-meta-checkpoint``, ...) or a guess from the files.
    sha256 : dict
        ``{file relative to the model: sha256}`` of the files hashed (provenance).
    verified : bool
        True when the pinned/recorded checksums were checked (a manifest name).
    entry : dict
        The manifest entry (empty for a bare path).
    """

    name: str
    path: Path
    kind: str
    sha256: dict[str, str] = field(default_factory=dict)
    verified: bool = False
    entry: dict[str, Any] = field(default_factory=dict)

    def expected_sha256(self, rel: str) -> str | None:
        """The pinned/recorded sha256 of file *rel*, if any."""
        return (self.entry.get("files") or {}).get(rel) or None

    def provenance(self) -> dict[str, Any]:
        """JSON-friendly description for ``report.json``."""
        return {"name": self.name, "path": str(self.path), "kind": self.kind,
                "sha256": dict(self.sha256), "checksums_verified": self.verified}


def model_files(path: str | os.PathLike) -> list[str]:
    """The files of a model that loading reads: the checkpoint itself, or a folder's config and weights.

    For a folder: ``config.json``, the preprocessor/tokenizer configs present,
    and the first weights found in :data:`HF_WEIGHT_FILES` order (with the
    shards a ``*.index.json`` names). Paths relative to the folder.
    """
    path = Path(path)
    if path.is_file():
        return [path.name]
    out = [f for f in ("config.json", "preprocessor_config.json", "processor_config.json",
                       "tokenizer.json", "tokenizer_config.json") if (path / f).is_file()]
    for name in HF_WEIGHT_FILES:
        if (path / name).is_file():
            out.append(name)
            if name.endswith(".index.json"):
                try:
                    shards = json.loads((path / name).read_text(encoding="utf-8"))["weight_map"].values()
                except (OSError, KeyError, json.JSONDecodeError):
                    shards = []
                out.extend(sorted(set(shards)))
            break
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def verify_sha256(path: str | os.PathLike, expected: str | None) -> str:
    """sha256 of *path*; a :class:`WeightsError` when *expected* is given and differs."""
    actual = sha256_file(path)
    if expected and actual != expected:
        raise WeightsError(f"{path} is corrupted or a different version (sha256 {actual[:12]}..., "
                           f"expected {expected[:12]}...)")
    return actual


def load_state_dict(path: str | os.PathLike, *, expected_sha256: str | None = None,
                    map_location: str = "cpu") -> dict[str, Any]:
    """Read a tensor checkpoint safely.

    Parameters
    ----------
    path : path
        A ``.safetensors`` file (preferred: no code can run on load) or a
        pickled PyTorch checkpoint (``.pth``, ``.pt``, ``.bin``, ``.ckpt``).
    expected_sha256 : str, optional
        When given, the file is hashed first and refused if it differs; for a
        pickled file this happens *before* anything is unpickled.
    map_location : str
        Device the tensors are loaded onto.

    Returns
    -------
    dict
        ``{name: torch.Tensor}``. A checkpoint that wraps its weights in a
        ``"model"`` or ``"state_dict"`` entry is unwrapped.

    Raises
    ------
    WeightsError
        Missing file, checksum mismatch, unreadable file, or a pickle that
        holds more than tensors (``weights_only=True`` refuses to run code).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"missing weights file {path}")
    if expected_sha256:
        verify_sha256(path, expected_sha256)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=map_location)
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: unreadable safetensors file ({_first_line(exc)})") from None
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise WeightsError(
            f"{path}: not a plain tensor checkpoint, refused (loaded with weights_only=True: "
            f"{_first_line(exc)})"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def load_pretrained(cls: Any, path: str | os.PathLike, *, check_keys: bool = True, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` from a local folder only, offline, with a clear error for anything missing.

    Parameters
    ----------
    cls : class
        A transformers model class (``SamModel``, ...).
    path : path
        The model folder (``config.json`` and weights). Never a repository id.
    check_keys : bool
        Refuse a checkpoint that leaves model weights missing or of the wrong
        shape (transformers would otherwise initialise them at random, with
        only a log message).
    **kwargs
        Passed on (``dtype``, ...).

    Raises
    ------
    WeightsError
        Not a folder, no ``config.json``, no weights file, weights that do
        not fit the class, or anything transformers cannot read.
    """
    force_offline()
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"{path}: not a model folder (expected a folder with config.json and "
                           f"model.safetensors; nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise WeightsError(f"missing file {path / 'config.json'}: {path} is not a transformers model folder")
    present = [f for f in HF_WEIGHT_FILES if (path / f).is_file()]
    if not present:
        raise WeightsError(f"missing weights in {path}: expected one of {', '.join(HF_WEIGHT_FILES)}")
    kwargs.setdefault("use_safetensors", present[0].startswith("model.safetensors"))
    try:
        model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise WeightsError(f"{path}: cannot load {cls.__name__} from this folder ({_first_line(exc)})") from None
    if check_keys:
        bad = list(info.get("missing_keys") or []) + [str(k[0] if isinstance(k, tuple) else k)
                                                      for k in info.get("mismatched_keys") or []]
        if bad:
            raise WeightsError(
                f"{path}: the weights do not fit {cls.__name__} ({len(bad)} tensors missing or of the "
                f"wrong shape, e.g. {sorted(bad)[0]}); is this the right model folder?"
            )
    return model

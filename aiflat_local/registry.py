"""A tiny name -> maker registry shared by maskers and inpainters.

Backends register themselves with a decorator that records what they need
(Python packages, weights, frames). Heavy imports stay inside the backend's
``__call__``/constructor, so listing the registry never imports torch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

from .errors import BackendError

T = TypeVar("T")


@dataclass(frozen=True)
class BackendInfo:
    """What a registry knows about one backend without building it."""

    name: str
    summary: str
    requires: tuple[str, ...] = ()  # importable module names
    needs_weights: bool = False
    needs_frames: bool = False

    def missing(self) -> list[str]:
        """Required modules that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


@dataclass
class Registry(Generic[T]):
    """Maps backend names to makers (classes or factories)."""

    kind: str
    _makers: dict[str, Callable[..., T]] = field(default_factory=dict)
    _info: dict[str, BackendInfo] = field(default_factory=dict)

    def register(self, name: str, summary: str, *, requires: tuple[str, ...] = (),
                 needs_weights: bool = False, needs_frames: bool = False):
        def deco(maker):
            if name in self._makers:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._makers[name] = maker
            self._info[name] = BackendInfo(name, summary, requires, needs_weights, needs_frames)
            return maker
        return deco

    def names(self) -> list[str]:
        return list(self._makers)

    def info(self, name: str) -> BackendInfo:
        self._check(name)
        return self._info[name]

    def _check(self, name: str) -> None:
        if name not in self._makers:
            raise BackendError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            )

    def accepts(self, name: str, option: str) -> bool:
        """Whether backend *name*'s maker takes keyword *option*."""
        import inspect

        self._check(name)
        try:
            params = inspect.signature(self._makers[name]).parameters
        except (TypeError, ValueError):
            return False
        return option in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def create(self, name: str, **options) -> T:
        """Build backend *name*; a missing optional dependency is one clear error."""
        self._check(name)
        missing = self._info[name].missing()
        if missing:
            raise BackendError(
                f"{self.kind} {name!r} needs the Python package(s) {', '.join(missing)}; "
                f"install them (pip install {' '.join(missing)})"
            )
        import inspect

        maker = self._makers[name]
        try:
            signature = inspect.signature(maker)
        except (TypeError, ValueError):
            signature = None
        if signature is not None and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            unknown = sorted(set(options) - set(signature.parameters))
            if unknown:
                known = [p for p in signature.parameters if p != "self"]
                raise BackendError(
                    f"{self.kind} {name!r} has no option {', '.join(unknown)}; "
                    f"its options: {', '.join(known) or 'none'}"
                )
        return maker(**options)


def import_backends(package: str, path) -> None:
    """Import every module of a backend package so that each registers itself.

    Modules whose names start with an underscore (private helpers) and ``base``
    are skipped. Backend modules must keep heavy imports inside functions.
    """
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")

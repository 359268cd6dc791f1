"""The version guard every compat patch goes through: what a patch declares (Patch, Upstream) and the run-time check
of the installed toolchain against the versions it was written for. Standard library only."""

from __future__ import annotations

import importlib
import re
import warnings
from dataclasses import dataclass
from importlib import metadata


class CompatWarning(UserWarning):
    """A patch was skipped: the installed toolchain is outside the versions it was written for."""


@dataclass(frozen=True)
class Upstream:
    """A symbol a patch replaces, wraps or reads: `module` + dotted `name`, with the parameter names it had when the
    patch was written (inspect.signature order; `self` included for functions defined on a class)."""

    module: str
    name: str
    params: tuple[str, ...] | None = None  # None: not called with arguments by us (a class, a module flag)

    def resolve(self):
        obj = importlib.import_module(self.module)
        for part in self.name.split("."):
            obj = getattr(obj, part)
        return obj


@dataclass(frozen=True, eq=False)
class Patch:
    name: str
    written_for: dict[str, tuple[str, str]]
    upstream: tuple[Upstream, ...] = ()

    def applies(self) -> bool:
        """True when every toolchain is inside the range; otherwise one CompatWarning and False."""
        for dist, (lo, hi) in self.written_for.items():
            found = installed_version(dist)
            if found is None or not version_in(found, lo, hi):
                skip(self, f"written for {dist} >={lo},<{hi}, found {found or 'none'}")
                return False
        return True


def skip(patch: Patch, why: str) -> None:
    warnings.warn(f"pit_export.compat: {patch.name}: {why}; skipped, upstream path taken", CompatWarning, stacklevel=3)


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: '2.13.0+cpu' -> (2, 13, 0), '1.6.0rc1' -> (1, 6, 0)."""
    m = re.match(r"\d+(?:\.\d+)*", version.strip().lstrip("v"))
    return tuple(int(x) for x in m.group().split(".")) if m else ()


def version_in(version: str, lo: str, hi: str) -> bool:
    v, a, b = release(version), release(lo), release(hi)
    if not v:
        return False
    n = max(len(v), len(a), len(b))
    v, a, b = (t + (0,) * (n - len(t)) for t in (v, a, b))
    return a <= v < b

"""The versions of the inference libraries this server is tested with. It reaches into
private parts of mlx-lm, mlx-vlm and llama-cpp-python (each behind one adapter module:
``backends/mlx/lm_adapter.py``, ``backends/mlx/vlm_adapter.py``,
``backends/llamacpp/adapter.py``), which change between minor releases, so a version
outside these ranges is named loudly at startup (it may still work)."""

from __future__ import annotations

import importlib.metadata
import logging

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

log = logging.getLogger("mlxserve.versions")

# Keep in step with pyproject.toml and README's "Supported versions".
SUPPORTED = {
    "mlx": SpecifierSet(">=0.29,<0.33"),
    "mlx-lm": SpecifierSet(">=0.28,<0.33"),
    "llama-cpp-python": SpecifierSet(">=0.3.16,<0.4"),
    # Optional (vision); scripts/setup installs 0.7.10.
    "mlx-vlm": SpecifierSet(">=0.7.10,<0.8"),
}


def unsupported() -> list[str]:
    """One line for each installed library whose version is outside its tested range."""
    out = []
    for name, spec in SUPPORTED.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        try:
            ok = Version(installed) in spec
        except InvalidVersion:
            ok = False
        if not ok:
            out.append(f"{name} {installed} is installed; this server is tested with {name}{spec}")
    return out


def check() -> None:
    """Warn, once at startup, about each library outside its tested range."""
    for line in unsupported():
        log.warning("UNTESTED LIBRARY VERSION: %s; expect failures", line)

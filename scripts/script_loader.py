"""Loading a script of this folder as a module. scripts/ is not a package: the model
generators and the benchmarks are files, loaded by path by each other and by the tests (which
have this folder on their import path: ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent


def load_script(name: str) -> Any:
    """A fresh copy of ``scripts/<name>.py`` as a module; fresh, so that a caller may set its
    module constants (a model's sizes, ...) without touching other callers' copies."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

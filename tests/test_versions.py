"""A library version outside the tested ranges is named at startup."""

from __future__ import annotations

import importlib.metadata
import logging

from mlxserve import versions


def test_the_installed_libraries_are_in_range():
    assert versions.unsupported() == []


def test_an_untested_version_is_named(monkeypatch, caplog):
    real = importlib.metadata.version

    def version(name: str) -> str:
        return "0.99.0" if name == "mlx-lm" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with caplog.at_level(logging.WARNING):
        versions.check()
    assert "mlx-lm 0.99.0 is installed" in caplog.text and "mlx-lm<0.33,>=0.28" in caplog.text

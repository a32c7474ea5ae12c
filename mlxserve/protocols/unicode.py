"""Lone surrogates (``"\\ud800"`` is valid JSON) cannot become UTF-8: refuse them anywhere in
a request, naming where, before a template or tokenizer meets them."""

from __future__ import annotations

from typing import Any

from mlxserve.errors import InvalidRequest


def check_unicode(value: Any, path: str = "") -> None:
    """Raise a 400 naming the first string in ``value`` (keys included) that is not valid
    Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where = path or "body"
            raise InvalidRequest(
                f"Invalid value for '{where}': text contains characters that are not valid "
                "Unicode.",
                param=path or None,
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, path)
            check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_unicode(item, f"{path}[{i}]")

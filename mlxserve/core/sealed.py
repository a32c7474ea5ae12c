"""Reasoning that travels through a client and comes back: Codex's ``encrypted_content`` and
Claude Code's thinking ``signature``.

Agents that keep no server-side state (``store: false``) send the model's earlier reasoning
back with each turn as an opaque string the server gave them. Ours is self-contained and
signed: ``mlxs1.<base64 of the zlib-compressed text>.<base64 of an HMAC-SHA256 tag>``, the key
kept in ``<home>/reasoning.key`` so that seals survive a restart. A seal that does not verify
(another server's, or tampered with) opens to nothing, and the reasoning is then taken from
whatever plain text the client sent beside it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import zlib
from pathlib import Path

log = logging.getLogger("mlxserve.sealed")

PREFIX = "mlxs1."
_KEY_BYTES = 32
# A sealed text larger than this (decompressed) is refused: a seal cannot be a zip bomb.
MAX_SEALED_CHARS = 4 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ReasoningSeal:
    """Seals reasoning text into an opaque string and opens such strings again."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a reasoning seal key needs at least 16 bytes")
        self._key = key

    @classmethod
    def from_home(cls, home: Path) -> ReasoningSeal:
        """The seal whose key lives in ``home/reasoning.key`` (made on first use, mode 0600)."""
        path = home / "reasoning.key"
        with contextlib.suppress(FileNotFoundError):
            key = path.read_bytes()
            if len(key) >= 16:
                return cls(key)
        home.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(_KEY_BYTES)
        part = path.with_suffix(f".part{os.getpid()}")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
        try:
            # Two servers starting on one home: the first key written wins for both.
            os.link(part, path)
        except FileExistsError:
            key = path.read_bytes()
        finally:
            part.unlink(missing_ok=True)
        return cls(key)

    def _tag(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest())

    def seal(self, text: str) -> str:
        body = _b64(zlib.compress(text.encode("utf-8")))
        return f"{PREFIX}{body}.{self._tag(body)}"

    def open(self, sealed: str | None) -> str | None:
        """The text ``sealed`` holds, or None when it is not one of our seals or does not
        verify."""
        if not sealed or not sealed.startswith(PREFIX):
            return None
        body, _, tag = sealed[len(PREFIX) :].partition(".")
        try:
            if not hmac.compare_digest(self._tag(body), tag):
                log.info("a reasoning seal did not verify; using the client's plain text")
                return None
            inflater = zlib.decompressobj()
            data = inflater.decompress(_unb64(body), MAX_SEALED_CHARS * 4)
            if inflater.unconsumed_tail:
                return None
            return data.decode("utf-8")
        except (binascii.Error, ValueError, TypeError, zlib.error):
            return None

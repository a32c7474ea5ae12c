"""API tokens, as LM Studio has them: off unless required, created with the CLI, stored hashed.

A token has LM Studio's shape, ``sk-lm-<id: 8 alphanumerics>:<passkey: 20 alphanumerics>``,
so the LM Studio SDKs accept it too (they split it into the websocket handshake's
``clientIdentifier`` and ``clientPasskey``; :meth:`TokenStore.verify_client` checks that
pair). Only the SHA-256 of the whole token is stored, and verification compares digests with
:func:`hmac.compare_digest`. The store is a small JSON file under ``MLXSERVE_HOME`` written
atomically, so the CLI and a running server share it: the server re-reads it when it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import string
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mlxserve.auth")

TOKEN_PREFIX = "sk-lm-"
TOKEN_PATTERN = re.compile(r"^sk-lm-([A-Za-z0-9]{8}):([A-Za-z0-9]{20})$")
_ALNUM = string.ascii_letters + string.digits


def _random_alnum(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    created_at: int


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class CorruptTokenFile(ValueError):
    """``tokens.json`` cannot be read as a token list: no token can be checked."""


class TokenStore:
    """Hashed API tokens in ``<home>/tokens.json``, read again only when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._entries: list[dict[str, object]] = []
        # The modification time of a corrupt file already reported, so it is logged once.
        self._reported: float | None = None

    # -- file ------------------------------------------------------------------
    def _load(self) -> list[dict[str, object]]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._mtime, self._entries = None, []
            return self._entries
        if mtime != self._mtime:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CorruptTokenFile(f"{self.path} is not valid JSON ({exc})") from exc
            entries = data.get("tokens", []) if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise CorruptTokenFile(f'{self.path} has no "tokens" list')
            self._entries = [e for e in entries if isinstance(e, dict)]
            self._mtime = mtime
        return self._entries

    def check(self) -> None:
        """Raise :class:`CorruptTokenFile` (or OSError) when the token file cannot be used."""
        with self._lock:
            self._load()

    def _save(self, entries: list[dict[str, object]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"tokens": entries}, f, indent=2)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._mtime = None

    # -- API -------------------------------------------------------------------
    def create(self, name: str = "") -> tuple[TokenInfo, str]:
        """A new token: its public info and the token itself (shown once, never stored)."""
        with self._lock:
            entries = list(self._load())
            token_id = _random_alnum(8)
            while any(e.get("id") == token_id for e in entries):
                token_id = _random_alnum(8)
            token = f"{TOKEN_PREFIX}{token_id}:{_random_alnum(20)}"
            info = TokenInfo(id=token_id, name=name, created_at=int(time.time()))
            entry = {"id": info.id, "name": name, "created_at": info.created_at}
            entries.append({**entry, "sha256": _digest(token)})
            self._save(entries)
            return info, token

    def list(self) -> list[TokenInfo]:
        with self._lock:
            return [
                TokenInfo(
                    id=str(e.get("id")),
                    name=str(e.get("name", "")),
                    created_at=int(str(e.get("created_at", 0))),
                )
                for e in self._load()
            ]

    def revoke(self, token_id: str) -> bool:
        """Remove a token by id (or by name when no id matches); False when none matched.
        ValueError for an empty name or one that several tokens share: name the id."""
        if not token_id:
            raise ValueError("Name the token to revoke by its id or name.")
        with self._lock:
            entries = list(self._load())
            kept = [e for e in entries if e.get("id") != token_id]
            if len(kept) == len(entries):
                kept = [e for e in entries if e.get("name") != token_id]
                if len(entries) - len(kept) > 1:
                    ids = ", ".join(str(e.get("id")) for e in entries if e not in kept)
                    raise ValueError(
                        f"{len(entries) - len(kept)} tokens are named '{token_id}'; "
                        f"revoke one by its id ({ids})."
                    )
            if len(kept) == len(entries):
                return False
            self._save(kept)
            return True

    def revoke_id(self, token_id: str) -> bool:
        """Remove the token with this id; False when there is none."""
        with self._lock:
            entries = list(self._load())
            kept = [e for e in entries if e.get("id") != token_id]
            if len(kept) == len(entries):
                return False
            self._save(kept)
            return True

    def verify(self, token: str) -> bool:
        """Whether ``token`` is a live token; constant time in the token's content."""
        digest = _digest(token)
        with self._lock:
            try:
                entries = self._load()
            except (OSError, ValueError) as exc:
                self._report(exc)
                return False
            ok = False
            for e in entries:
                ok |= hmac.compare_digest(digest, str(e.get("sha256", "")))
            return ok

    def _report(self, exc: Exception) -> None:
        try:
            mtime: float | None = self.path.stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime != self._reported or mtime is None:
            self._reported = mtime
            log.error(
                "THE API TOKEN FILE CANNOT BE READ: %s; every request needing a token gets "
                "401 until it is fixed (or removed and tokens created again with 'mlxserve "
                "token create')",
                exc,
            )

    def verify_client(self, client_identifier: str, client_passkey: str) -> bool:
        """The LM Studio SDK's websocket handshake (``clientIdentifier``, ``clientPasskey``):
        whether the pair is a live token split in two."""
        return self.verify(f"{TOKEN_PREFIX}{client_identifier}:{client_passkey}")

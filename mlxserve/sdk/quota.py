"""What one client may have in flight on the SDK websockets, across all its connections."""

from __future__ import annotations

import hashlib


class SdkQuota:
    """Counts in-flight calls and channels per client: the token it authenticated with, or
    its ``clientIdentifier`` when authentication is off. Opening more connections does not
    raise a client's share."""

    def __init__(self) -> None:
        self._in_flight: dict[tuple[str, str], int] = {}

    @staticmethod
    def principal(credential: str) -> str:
        # Only a digest is kept: the quota never holds a live token.
        return hashlib.sha256(credential.encode("utf-8", "replace")).hexdigest()

    def acquire(self, principal: str, kind: str, limit: int) -> bool:
        key = (principal, kind)
        n = self._in_flight.get(key, 0)
        if n >= limit:
            return False
        self._in_flight[key] = n + 1
        return True

    def release(self, principal: str, kind: str) -> None:
        key = (principal, kind)
        n = self._in_flight.get(key, 0) - 1
        if n > 0:
            self._in_flight[key] = n
        else:
            self._in_flight.pop(key, None)

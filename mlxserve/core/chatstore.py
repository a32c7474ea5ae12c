"""Stored conversations for stateful chat (``/api/v1/chat``, ``/v1/responses``).

Every stored response is a branch point: it records the messages its turn added (the new
input and the model's output) and the response it continued from. A response's history is
its chain of turns back to the root, so continuing from any earlier response sees exactly
that branch. SQLite under ``MLXSERVE_HOME``, so chats survive a restart.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxserve.errors import MlxServeError

# Guards against a corrupt chain (a cycle can only come from a hand-edited database).
MAX_TURNS = 10_000


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class ResponseNotFound(MlxServeError):
    status = 404
    kind = "invalid_request_error"
    code = "previous_response_not_found"

    def __init__(self, response_id: str) -> None:
        shown = response_id if response_id.replace("_", "").isalnum() else "given"
        super().__init__(f"No stored response with id '{shown}'.", param="previous_response_id")


@dataclass(frozen=True)
class StoredTurn:
    id: str
    parent_id: str | None
    model: str
    system: str | None
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]
    created: float


@dataclass(frozen=True)
class Conversation:
    """What a continuation needs: the branch's messages and its latest system prompt."""

    system: str | None
    messages: list[dict[str, Any]]


class ChatStore:
    """Thread-safe; the async methods run the SQLite work off the event loop."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " id TEXT PRIMARY KEY, parent_id TEXT, model TEXT NOT NULL, system TEXT,"
                " input TEXT NOT NULL, output TEXT NOT NULL, created REAL NOT NULL)"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _get(self, response_id: str) -> StoredTurn | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, parent_id, model, system, input, output, created FROM responses"
                " WHERE id = ?",
                (response_id,),
            ).fetchone()
        if row is None:
            return None
        return StoredTurn(
            id=row[0],
            parent_id=row[1],
            model=row[2],
            system=row[3],
            input=json.loads(row[4]),
            output=json.loads(row[5]),
            created=row[6],
        )

    def get(self, response_id: str) -> StoredTurn:
        turn = self._get(response_id)
        if turn is None:
            raise ResponseNotFound(response_id)
        return turn

    def conversation(self, response_id: str) -> Conversation:
        """The messages of the branch ending at ``response_id``, oldest first."""
        turns: list[StoredTurn] = []
        current: str | None = response_id
        while current is not None and len(turns) < MAX_TURNS:
            turn = self.get(current)
            turns.append(turn)
            current = turn.parent_id
        turns.reverse()
        messages = [m for t in turns for m in (*t.input, *t.output)]
        system = next((t.system for t in reversed(turns) if t.system), None)
        return Conversation(system, messages)

    def save(
        self,
        *,
        parent_id: str | None,
        model: str,
        system: str | None,
        input: list[dict[str, Any]],
        output: list[dict[str, Any]],
        response_id: str | None = None,
    ) -> str:
        """Store one turn; returns its response id (``response_id`` when given: a dialect that
        announces the id before the turn is generated)."""
        response_id = response_id or new_response_id()
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO responses (id, parent_id, model, system, input, output, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    response_id,
                    parent_id,
                    model,
                    system,
                    json.dumps(input, ensure_ascii=False),
                    json.dumps(output, ensure_ascii=False),
                    time.time(),
                ),
            )
        return response_id

    async def aconversation(self, response_id: str) -> Conversation:
        return await asyncio.to_thread(self.conversation, response_id)

    async def asave(self, **kwargs: Any) -> str:
        return await asyncio.to_thread(lambda: self.save(**kwargs))

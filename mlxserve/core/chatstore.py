"""Stored conversations for stateful chat (``/api/v1/chat``, ``/v1/responses``).

Every stored response is a branch point: it records the messages its turn added (the new
input and the model's output) and the response it continued from. A response's history is
its chain of turns back to the root, so continuing from any earlier response sees exactly
that branch. SQLite under ``MLXSERVE_HOME``, so chats survive a restart.

A *chat* is the tree of turns grown from one root turn (its id is the root's response id):
listed with a title (its first user message until renamed), renamed and deleted as one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxserve.core import images
from mlxserve.core.images import ImagePart
from mlxserve.errors import MlxServeError

log = logging.getLogger(__name__)

# Guards against a corrupt chain (a cycle can only come from a hand-edited database).
MAX_TURNS = 10_000
TITLE_CHARS = 80
# Retention runs at most this often after saves (it also runs when the store opens).
PRUNE_INTERVAL_SECONDS = 60.0
# A response read to be continued keeps its chat from retention until the continuation is
# saved, or this long if it never is (the request failed or did not store).
PIN_SECONDS = 3600.0
IMAGE_REF = re.compile(r'"__image_sha256__": "([0-9a-f]{64})"')


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def _shown_id(given: str) -> str:
    """An id as an error message may echo it: only ids of our own shape."""
    return given if given.replace("_", "").isalnum() else "given"


class ResponseNotFound(MlxServeError):
    status = 404
    kind = "invalid_request_error"
    code = "previous_response_not_found"

    def __init__(self, response_id: str) -> None:
        shown = _shown_id(response_id)
        super().__init__(f"No stored response with id '{shown}'.", param="previous_response_id")


class ChatNotFound(MlxServeError):
    status = 404
    kind = "invalid_request_error"
    code = "chat_not_found"

    def __init__(self, chat_id: str) -> None:
        super().__init__(f"No stored chat with id '{_shown_id(chat_id)}'.", param="chat_id")


@dataclass(frozen=True)
class StoredTurn:
    id: str
    parent_id: str | None
    model: str
    system: str | None
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]
    created: float
    chat_id: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent_id": self.parent_id,
            "model": self.model,
            "system": self.system,
            "input": images.described(self.input),
            "output": images.described(self.output),
            "created_at": self.created,
        }


@dataclass(frozen=True)
class ChatSummary:
    id: str
    title: str
    model: str
    created: float
    updated: float
    # The turn last added: where the chat continues by default.
    head: str
    turns: int

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "model": self.model,
            "created_at": self.created,
            "updated_at": self.updated,
            "head_response_id": self.head,
            "turns": self.turns,
        }


def title_of(messages: list[dict[str, Any]]) -> str:
    """A chat's default title: its first user message's text, on one line."""
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict)
            )
        text = " ".join(str(content or "").split())
        if text:
            return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "\u2026"
    return "New chat"


@dataclass(frozen=True)
class Conversation:
    """What a continuation needs: the branch's messages and its latest system prompt."""

    system: str | None
    messages: list[dict[str, Any]]


class StoreClosed(MlxServeError):
    status = 503
    kind = "server_error"
    code = "server_shutting_down"

    def __init__(self) -> None:
        super().__init__("The server is shutting down; the chat was not stored.")


class ChatStore:
    """Thread-safe; the async methods run the SQLite work off the event loop.

    Retention: chats not continued for ``max_age_days`` and, while the stored turns take more
    than ``max_bytes``, the least recently continued chats are deleted (0 turns either off),
    when the store opens and after saves. A chat whose response a request is continuing is
    kept until that request saved its turn."""

    def __init__(
        self,
        path: Path,
        *,
        max_age_days: float = 0.0,
        max_bytes: int = 0,
        prune_interval: float = PRUNE_INTERVAL_SECONDS,
    ) -> None:
        self.max_age_days = max_age_days
        self.max_bytes = max_bytes
        self._prune_interval = prune_interval
        self._last_prune = 0.0
        # response id -> (readers continuing it, when the last one began)
        self._pins: dict[str, tuple[int, float]] = {}
        # Saves asked for and not finished: close() waits for them.
        self._in_flight = 0
        self._closing = False
        self._closed = False
        self._idle = threading.Condition()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Images of stored turns, once each, named by the SHA-256 of their bytes.
        self._images = path.parent / "images"
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " id TEXT PRIMARY KEY, parent_id TEXT, model TEXT NOT NULL, system TEXT,"
                " input TEXT NOT NULL, output TEXT NOT NULL, created REAL NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS chats (id TEXT PRIMARY KEY, title TEXT NOT NULL,"
                " created REAL NOT NULL, updated REAL NOT NULL, head TEXT NOT NULL)"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
            # Databases from before chats were listed: add the columns, then file their turns.
            if "chat_id" not in columns:
                self._db.execute("ALTER TABLE responses ADD COLUMN chat_id TEXT")
            if "reply" not in columns:
                # The /v1/responses object as returned, for GET /v1/responses/{id}.
                self._db.execute("ALTER TABLE responses ADD COLUMN reply TEXT")
            self._db.execute("CREATE INDEX IF NOT EXISTS responses_chat ON responses(chat_id)")
            self._file_orphans()
        self.prune()

    def _file_orphans(self) -> None:
        """Give every turn without a chat the chat of its root (caller holds the lock)."""
        rows = self._db.execute(
            "SELECT id, parent_id, input, created FROM responses WHERE chat_id IS NULL"
            " ORDER BY created"
        ).fetchall()
        for turn_id, parent_id, input_json, created in rows:
            chat_id = turn_id
            if parent_id is not None:
                parent = self._db.execute(
                    "SELECT chat_id FROM responses WHERE id = ?", (parent_id,)
                ).fetchone()
                chat_id = parent[0] if parent and parent[0] else parent_id
            self._file(turn_id, chat_id, json.loads(input_json), created)

    def _file(self, turn_id: str, chat_id: str, input: list[dict[str, Any]], now: float) -> None:
        self._db.execute("UPDATE responses SET chat_id = ? WHERE id = ?", (chat_id, turn_id))
        updated = self._db.execute(
            "UPDATE chats SET updated = ?, head = ? WHERE id = ?", (now, turn_id, chat_id)
        ).rowcount
        if not updated:
            self._db.execute(
                "INSERT INTO chats (id, title, created, updated, head) VALUES (?, ?, ?, ?, ?)",
                (chat_id, title_of(input), now, now, turn_id),
            )

    def close(self, timeout: float = 30.0) -> None:
        """Close once the saves already asked for (:meth:`asave`) are written; later ones
        fail with :class:`StoreClosed`."""
        with self._idle:
            self._closing = True
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout)
        with self._lock:
            self._closed = True
            self._db.close()

    _COLUMNS = "id, parent_id, model, system, input, output, created, chat_id"

    def _turn(self, row: tuple[Any, ...]) -> StoredTurn:
        return StoredTurn(
            id=row[0],
            parent_id=row[1],
            model=row[2],
            system=row[3],
            input=json.loads(row[4], object_hook=self._load_image),
            output=json.loads(row[5], object_hook=self._load_image),
            created=row[6],
            chat_id=row[7] or row[0],
        )

    def _get(self, response_id: str) -> StoredTurn | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._COLUMNS} FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        return None if row is None else self._turn(row)

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
        reply: dict[str, Any] | None = None,
    ) -> str:
        """Store one turn; returns its response id (``response_id`` when given: a dialect that
        announces the id before the turn is generated). ``reply``: the response object as the
        client got it, for ``GET /v1/responses/{id}``."""
        response_id = response_id or new_response_id()
        now = time.time()
        with self._lock, self._db:
            if self._closed:
                raise StoreClosed()
            chat_id = response_id
            if parent_id is not None:
                row = self._db.execute(
                    "SELECT chat_id FROM responses WHERE id = ?", (parent_id,)
                ).fetchone()
                chat_id = row[0] if row and row[0] else parent_id
            self._db.execute(
                "INSERT INTO responses (id, parent_id, model, system, input, output, created,"
                " reply) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    response_id,
                    parent_id,
                    model,
                    system,
                    json.dumps(input, ensure_ascii=False, default=self._store_image),
                    json.dumps(output, ensure_ascii=False, default=self._store_image),
                    now,
                    None if reply is None else json.dumps(reply, ensure_ascii=False),
                ),
            )
            self._file(response_id, chat_id, input, now)
        if parent_id is not None:
            self._unpin(parent_id)
        if now - self._last_prune >= self._prune_interval:
            self.prune()
        return response_id

    # --- retention --------------------------------------------------------------------------

    def _pin(self, response_id: str) -> None:
        with self._idle:
            count, _ = self._pins.get(response_id, (0, 0.0))
            self._pins[response_id] = (count + 1, time.monotonic())

    def _unpin(self, response_id: str) -> None:
        with self._idle:
            count, since = self._pins.get(response_id, (0, 0.0))
            if count > 1:
                self._pins[response_id] = (count - 1, since)
            else:
                self._pins.pop(response_id, None)

    def _pinned(self) -> set[str]:
        now = time.monotonic()
        with self._idle:
            for key, (_, since) in list(self._pins.items()):
                if now - since > PIN_SECONDS:
                    del self._pins[key]
            return set(self._pins)

    def prune(self) -> list[str]:
        """Apply the retention settings; returns the ids of the chats deleted, oldest first."""
        self._last_prune = time.time()
        if self.max_age_days <= 0 and self.max_bytes <= 0:
            return []
        pinned = self._pinned()
        with self._lock, self._db:
            if self._closed:
                return []
            placeholders = ",".join("?" * len(pinned))
            busy = {
                row[0]
                for row in self._db.execute(
                    f"SELECT chat_id FROM responses WHERE id IN ({placeholders})", tuple(pinned)
                )
            }
            rows = self._db.execute(
                "SELECT c.id, c.updated, (SELECT IFNULL(SUM(LENGTH(CAST(input AS BLOB))"
                " + LENGTH(CAST(output AS BLOB)) + IFNULL(LENGTH(CAST(reply AS BLOB)), 0)), 0)"
                " FROM responses WHERE chat_id = c.id) FROM chats c ORDER BY c.updated"
            ).fetchall()
            total = sum(size for _, _, size in rows)
            cutoff = time.time() - self.max_age_days * 86400 if self.max_age_days > 0 else None
            doomed: list[str] = []
            for chat_id, updated, size in rows:
                too_old = cutoff is not None and updated < cutoff
                too_big = self.max_bytes > 0 and total > self.max_bytes
                if not (too_old or too_big):
                    break
                if chat_id in busy:
                    continue
                doomed.append(chat_id)
                total -= size
            images: set[str] = set()
            for chat_id in doomed:
                for input_json, output_json in self._db.execute(
                    "SELECT input, output FROM responses WHERE chat_id = ?", (chat_id,)
                ):
                    images.update(IMAGE_REF.findall(input_json + output_json))
                self._db.execute("DELETE FROM responses WHERE chat_id = ?", (chat_id,))
                self._db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))
            orphans = [
                digest
                for digest in images
                if self._db.execute(
                    "SELECT 1 FROM responses WHERE instr(input, ?) OR instr(output, ?) LIMIT 1",
                    (digest, digest),
                ).fetchone()
                is None
            ]
        for digest in orphans:
            (self._images / digest).unlink(missing_ok=True)
        if doomed:
            log.info("chat store retention deleted %d chat(s)", len(doomed))
        return doomed

    # --- the response objects of /v1/responses --------------------------------------------

    def reply(self, response_id: str) -> dict[str, Any]:
        """The stored response object of a ``/v1/responses`` turn."""
        with self._lock:
            row = self._db.execute(
                "SELECT reply FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        if row is None or row[0] is None:
            raise ResponseNotFound(response_id)
        reply: dict[str, Any] = json.loads(row[0])
        return reply

    def delete_response(self, response_id: str) -> None:
        """Delete one turn. The turns continuing from it keep their history: its messages
        move into each of them, and their parent becomes its parent."""
        turn = self.get(response_id)
        carried = [*turn.input, *turn.output]
        with self._lock, self._db:
            children = self._db.execute(
                "SELECT id, input FROM responses WHERE parent_id = ?", (response_id,)
            ).fetchall()
            for child_id, child_input in children:
                merged = carried + json.loads(child_input)
                self._db.execute(
                    "UPDATE responses SET parent_id = ?, input = ? WHERE id = ?",
                    (
                        turn.parent_id,
                        json.dumps(merged, ensure_ascii=False, default=self._store_image),
                        child_id,
                    ),
                )
            self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
            self._refile_chat(turn.chat_id)

    def _refile_chat(self, chat_id: str) -> None:
        """After turns left a chat: drop it if empty, else point its head at its newest turn
        (the chat keeps its id even when its root turn went)."""
        newest = self._db.execute(
            "SELECT id FROM responses WHERE chat_id = ? ORDER BY created DESC LIMIT 1",
            (chat_id,),
        ).fetchone()
        if newest is None:
            self._db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))
        else:
            self._db.execute("UPDATE chats SET head = ? WHERE id = ?", (newest[0], chat_id))

    # --- chats ------------------------------------------------------------------------------

    _CHAT = (
        "SELECT c.id, c.title, c.created, c.updated, c.head,"
        " (SELECT model FROM responses WHERE id = c.head),"
        " (SELECT COUNT(*) FROM responses WHERE chat_id = c.id) FROM chats c"
    )

    @staticmethod
    def _summary(row: tuple[Any, ...]) -> ChatSummary:
        return ChatSummary(
            id=row[0],
            title=row[1],
            created=row[2],
            updated=row[3],
            head=row[4],
            model=row[5] or "",
            turns=row[6],
        )

    def chats(self, limit: int = 200) -> list[ChatSummary]:
        """The chats, the most recently continued first."""
        with self._lock:
            rows = self._db.execute(
                f"{self._CHAT} ORDER BY c.updated DESC LIMIT ?", (limit,)
            ).fetchall()
        return [self._summary(row) for row in rows]

    def chat(self, chat_id: str) -> tuple[ChatSummary, list[StoredTurn]]:
        """A chat and all its turns (every branch), oldest first."""
        with self._lock:
            row = self._db.execute(f"{self._CHAT} WHERE c.id = ?", (chat_id,)).fetchone()
            if row is None:
                raise ChatNotFound(chat_id)
            turns = self._db.execute(
                f"SELECT {self._COLUMNS} FROM responses WHERE chat_id = ? ORDER BY created",
                (chat_id,),
            ).fetchall()
        return self._summary(row), [self._turn(t) for t in turns]

    def rename_chat(self, chat_id: str, title: str) -> ChatSummary:
        with self._lock, self._db:
            if not self._db.execute(
                "UPDATE chats SET title = ? WHERE id = ?", (title, chat_id)
            ).rowcount:
                raise ChatNotFound(chat_id)
        return self.chat(chat_id)[0]

    def delete_chat(self, chat_id: str) -> None:
        """Delete a chat with every turn of every branch."""
        with self._lock, self._db:
            if not self._db.execute("DELETE FROM chats WHERE id = ?", (chat_id,)).rowcount:
                raise ChatNotFound(chat_id)
            self._db.execute("DELETE FROM responses WHERE chat_id = ?", (chat_id,))

    def _store_image(self, value: Any) -> Any:
        if not isinstance(value, ImagePart):
            raise TypeError(f"{type(value).__name__} cannot be stored")
        digest = value.sha256
        target = self._images / digest
        if not target.is_file():
            self._images.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f".{digest}.{threading.get_ident()}")
            part.write_bytes(value.data)
            os.replace(part, target)
        return {"__image_sha256__": digest, "media_type": value.media_type}

    def _load_image(self, value: dict[str, Any]) -> Any:
        digest = value.get("__image_sha256__")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return value
        try:
            data = (self._images / digest).read_bytes()
        except OSError:
            data = b""  # refused with a 400 when the turn is continued
        return ImagePart(data, str(value.get("media_type") or ""), param="previous_response_id")

    async def aconversation(self, response_id: str) -> Conversation:
        """The branch to continue; its chat is kept from retention until the continuation
        is saved."""
        conversation = await asyncio.to_thread(self.conversation, response_id)
        self._pin(response_id)
        return conversation

    def asave(self, **kwargs: Any) -> Awaitable[str]:
        """:meth:`save` off the event loop. The save counts as in flight from this call (not
        from the first await), and runs to the end even if the caller is cancelled, so a
        close racing it waits and nothing asked for is lost."""
        with self._idle:
            if self._closing:
                raise StoreClosed()
            self._in_flight += 1

        def run() -> str:
            try:
                return self.save(**kwargs)
            finally:
                with self._idle:
                    self._in_flight -= 1
                    self._idle.notify_all()

        return asyncio.shield(asyncio.get_running_loop().run_in_executor(None, run))

"""Prompt-cache entries spilled to disk, so that a prefix outlives an unload or a restart.

Format-neutral: an entry is the token ids a KV cache holds, a small JSON description and an
engine-specific payload (MLX: safetensors; GGUF: llama.cpp sequence state). One file per
entry under ``<home>/prompt-cache/<model identity>/``::

    MAGIC · u64 header length · header JSON · tokens (int64 LE) · payload · sha256 of all before

Files are written by a writer thread, to a temporary name then renamed, so the owner thread
never waits on the disk and a reader never sees half a file. The checksum is verified on
every load: a damaged file is deleted and the prompt is computed again. All models' entries
share one byte budget, least recently used (file mtime) deleted first.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from backends.base import LoadOptions, common_prefix

log = logging.getLogger("mlxserve.backends")

MAGIC = b"MLXSPIL1"
SUFFIX = ".kv"
_TMP = ".tmp-"
_DIGEST = 32
# Entries shorter than this, or hits adding fewer tokens, are not worth a disk round trip.
MIN_TOKENS = 16
# Nor is a file of which the prompt shares less than one part in this many.
MAX_UNSHARED = 8

# What writes the payload into the open file.
PayloadWriter = Callable[[IO[bytes]], object]


def model_identity(label: str, files: Iterable[Path], kv: dict[str, Any]) -> str:
    """A folder name for one model's entries (``label`` keeps it readable): the model files'
    paths, sizes and modification times and what decides the KV layout (dtype,
    quantization). Entries under another identity hold KV this model cannot reuse."""
    parts = []
    for f in sorted(files):
        st = f.stat()
        parts.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(json.dumps([parts, kv], sort_keys=True).encode()).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:48]
    return f"{safe}-{digest[:20]}"


def open_store(
    options: LoadOptions,
    label: str,
    files: Iterable[Path],
    kv: dict[str, Any],
    *,
    trimmable: bool = True,
) -> SpillStore | None:
    """The spill store of a model loaded with ``options`` (see :func:`model_identity`), or
    None when spilling is off or its folder cannot be used: the model then serves without
    it (a warning says why), never fails to load for it."""
    if options.prompt_cache_dir is None or options.prompt_cache_disk_bytes <= 0:
        return None
    try:
        identity = model_identity(label, files, kv)
        budget = options.prompt_cache_disk_bytes
        return SpillStore(options.prompt_cache_dir, identity, budget, trimmable=trimmable)
    except OSError as exc:
        log.warning("prompt cache spilling is off for %s: %s", label, exc)
        return None


def longest_prefix(
    keys: Iterable[tuple[int, ...]],
    prompt: Sequence[int],
    have: int = 0,
    *,
    trimmable: bool = True,
    min_gain: int = MIN_TOKENS,
) -> tuple[tuple[int, ...] | None, int]:
    """Of the entries ``keys``, the one sharing the longest prefix with ``prompt`` (never its
    last token: sampling needs its logits) and that length, if restoring it is worth it: it
    adds at least ``min_gain`` to the ``have`` tokens already cached, and the entry is not
    mostly tokens the prompt does not share. Entries that cannot be cut back (``trimmable``
    false) serve only a prompt that holds them whole."""
    best: tuple[int, ...] | None = None
    best_n = 0
    limit = len(prompt) - 1
    for key in keys:
        n = common_prefix(key, prompt, limit)
        if not trimmable and n < len(key):
            continue
        if n > best_n or (n == best_n and best is not None and len(key) < len(best)):
            best, best_n = key, n
    if best is None or best_n - have < min_gain or best_n * MAX_UNSHARED < len(best):
        return None, 0
    return best, best_n


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array.array("q", tokens)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def _tokens_from(data: bytes) -> tuple[int, ...]:
    arr = array.array("q")
    arr.frombytes(data)
    if sys.byteorder != "little":
        arr.byteswap()
    return tuple(arr)


class SpillStore:
    """One model's spilled prompt-cache entries, indexed by the tokens they hold.

    ``longest`` and ``read`` run on the owner thread, ``put`` queues a write for the writer
    thread; the index is shared under a lock. ``budget`` bytes bound every model's files
    under ``root`` together. Entries of a model whose cache cannot be cut back to a shorter
    prefix (``trimmable`` false: a recurrent state) serve only prompts holding them whole, so
    a longer entry does not make a shorter one useless."""

    def __init__(self, root: Path, identity: str, budget: int, *, trimmable: bool = True) -> None:
        self.root = root
        self.trimmable = trimmable
        self.folder = root / identity
        self.budget = budget
        self._lock = threading.Lock()
        self._index: dict[tuple[int, ...], Path] = {}
        self._queue: queue.Queue[tuple[tuple[int, ...], dict[str, Any], PayloadWriter] | None]
        self._queue = queue.Queue()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._scan()
        self._writer = threading.Thread(
            target=self._write_loop, name=f"spill:{identity}", daemon=True
        )
        self._writer.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # --- owner thread ---------------------------------------------------------------------

    def longest(self, prompt: Sequence[int], have: int = 0) -> tuple[tuple[int, ...] | None, int]:
        """The stored entry sharing the longest prefix with ``prompt`` and that length, if
        reading it is worth it (see :func:`longest_prefix`)."""
        with self._lock:
            return longest_prefix(self._index, prompt, have, trimmable=self.trimmable)

    def read(self, key: tuple[int, ...]) -> tuple[dict[str, Any], memoryview] | None:
        """The entry's description and payload, checksum verified; None (and the file gone)
        if it is missing, truncated or damaged."""
        with self._lock:
            path = self._index.get(key)
        if path is None:
            return None
        try:
            data = path.read_bytes()
            meta, tokens, payload = _parse(data)
            if tokens != key:
                raise ValueError("its tokens changed")
        except (OSError, ValueError) as exc:
            log.warning("prompt cache file %s dropped: %s", path.name, exc)
            self._forget(key, delete=True)
            return None
        # The file's mtime is its last use: least recently used goes first, across restarts.
        now = time.time()
        with contextlib.suppress(OSError):
            os.utime(path, (now, now))
        return meta, payload

    def discard(self, key: tuple[int, ...]) -> None:
        """Delete an entry whose payload the engine could not restore."""
        self._forget(key, delete=True)

    def _covers(self, longer: tuple[int, ...], key: tuple[int, ...]) -> bool:
        if not self.trimmable:
            return longer == key
        return len(longer) >= len(key) and longer[: len(key)] == key

    def _has(self, key: tuple[int, ...]) -> bool:
        with self._lock:
            return any(self._covers(k, key) for k in self._index)

    def wants(self, tokens: Sequence[int]) -> bool:
        """Whether an entry for ``tokens`` would be written: not too short, and no stored
        entry holds these tokens (or more after them) already."""
        return len(tokens) >= MIN_TOKENS and self.budget > 0 and not self._has(tuple(tokens))

    def put(self, tokens: Sequence[int], meta: dict[str, Any], payload: PayloadWriter) -> None:
        """Queue an entry for writing; ``payload`` runs on the writer thread and must only
        read immutable data (evaluated arrays, bytes)."""
        if self.wants(tokens):
            self._queue.put((tuple(tokens), meta, payload))

    def flush(self) -> None:
        """Wait until every queued write is on disk."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        self._queue.put(None)
        self._writer.join()

    # --- writer thread --------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:
                log.exception("writing a prompt cache file failed")
            finally:
                self._queue.task_done()

    def _write(self, key: tuple[int, ...], meta: dict[str, Any], payload: PayloadWriter) -> None:
        if self._has(key):
            return
        name = hashlib.sha256(_token_bytes(key)).hexdigest()[:32] + SUFFIX
        final = self.folder / name
        tmp = self.folder / f"{name}{_TMP}{uuid.uuid4().hex[:8]}"
        header = json.dumps({"tokens": len(key), "meta": meta}).encode()
        try:
            with open(tmp, "w+b") as f:
                f.write(MAGIC + struct.pack("<Q", len(header)) + header)
                f.write(_token_bytes(key))
                payload(f)
                f.flush()
                f.seek(0)
                digest = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                f.write(digest.digest())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            # An entry this one extends is covered by it: a hit on either finds this one.
            covered = [k for k in self._index if self._covers(key, k)]
            self._index[key] = final
        for k in covered:
            self._forget(k, delete=True)
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        """Delete the least recently used files, of every model, until the budget holds."""
        files: list[tuple[float, int, Path]] = []
        for path in self.root.glob(f"*/*{SUFFIX}"):
            try:
                st = path.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.budget:
                break
            path.unlink(missing_ok=True)
            total -= size
            with self._lock:
                gone = [k for k, p in self._index.items() if p == path]
            for k in gone:
                self._forget(k, delete=False)

    # --- index ----------------------------------------------------------------------------

    def _forget(self, key: tuple[int, ...], *, delete: bool) -> None:
        with self._lock:
            path = self._index.pop(key, None)
        if path is not None and delete:
            path.unlink(missing_ok=True)

    def _scan(self) -> None:
        """Index the files already here (their headers only), dropping what cannot be read
        and temporary files a stopped writer left behind."""
        for path in self.folder.iterdir():
            if _TMP in path.name:
                path.unlink(missing_ok=True)
                continue
            if path.suffix != SUFFIX:
                continue
            try:
                st = path.stat()
                with open(path, "rb") as f:
                    tokens = _read_tokens(f, st.st_size)
            except (OSError, ValueError) as exc:
                log.warning("prompt cache file %s dropped: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            self._index[tokens] = path


def _read_tokens(f: IO[bytes], size: int) -> tuple[int, ...]:
    head = f.read(len(MAGIC) + 8)
    if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
        raise ValueError("not a prompt cache file")
    (hlen,) = struct.unpack("<Q", head[len(MAGIC) :])
    header = json.loads(f.read(hlen))
    n = int(header["tokens"])
    if len(head) + hlen + 8 * n + _DIGEST > size:
        raise ValueError("truncated")
    return _tokens_from(f.read(8 * n))


def _parse(data: bytes) -> tuple[dict[str, Any], tuple[int, ...], memoryview]:
    if len(data) < len(MAGIC) + 8 + _DIGEST or data[: len(MAGIC)] != MAGIC:
        raise ValueError("not a prompt cache file")
    body = memoryview(data)[:-_DIGEST]
    if hashlib.sha256(body).digest() != data[-_DIGEST:]:
        raise ValueError("checksum mismatch")
    start = len(MAGIC) + 8
    (hlen,) = struct.unpack("<Q", data[len(MAGIC) : start])
    try:
        header = json.loads(bytes(body[start : start + hlen]))
        n = int(header["tokens"])
        meta = header["meta"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError("unreadable header") from exc
    tokens_end = start + hlen + 8 * n
    if tokens_end > len(body):
        raise ValueError("truncated")
    tokens = _tokens_from(bytes(body[start + hlen : tokens_end]))
    return meta, tokens, body[tokens_end:]

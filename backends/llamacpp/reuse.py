"""Changed-middle prompt-cache reuse on GGUF: llama-server's ``--cache-reuse``, extended.

After the exact prefix a new prompt shares with a kept sequence, runs of at least
``cache_reuse`` tokens that both still share (the text after a changed line, after inserted
text, after an edited tool result) keep their KV cells: llama.cpp moves them to their new
positions (``llama_memory_seq_add`` re-rotates their keys) and only the tokens between them
are computed. llama-server only skips cached tokens (a deletion); here the prompt may also
hold tokens the cache lacks (a substitution or an insertion). Runs are monotonic: of blocks
that changed order (a reordered tool list) those found in the old order are reused and the
others computed again.

llama.cpp decodes a sequence's tokens only right after its highest position, so the moved
runs wait in a second sequence id, the *hold* (the kept sequence they came from), and are
attached to the request's sequence (``llama_memory_seq_cp``) when decoding reaches them.

Not exact: a moved run's keys and values were computed attending to the old text before it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import llama_cpp

from backends.base import common_prefix

# Tokens hashed to find where a run may start; runs are then checked on their whole length.
_KEY = 8
# Candidate starts looked at per prompt position (repetitive text has many).
_CANDIDATES = 4


@dataclass(frozen=True)
class Run:
    """``n`` tokens at position ``old`` of the kept sequence that the new prompt holds at
    position ``new``."""

    old: int
    new: int
    n: int


def _extent(a: Sequence[int], i: int, b: Sequence[int], j: int, limit: int) -> int:
    n = 0
    while n < limit and a[i + n] == b[j + n]:
        n += 1
    return n


def align(
    cached: Sequence[int], prompt: Sequence[int], start: int, floor: int, min_run: int, end: int
) -> list[Run]:
    """Monotonic runs of at least ``min_run`` tokens shared by ``cached[floor:]`` and
    ``prompt[start:end]``, found greedily from the left (the longest of a few candidates at
    each prompt position)."""
    if min_run <= 0:
        return []
    key = min(_KEY, min_run)
    where: dict[tuple[int, ...], list[int]] = {}
    for c in range(floor, len(cached) - min_run + 1):
        where.setdefault(tuple(cached[c : c + key]), []).append(c)
    runs: list[Run] = []
    c_head, p = floor, start
    while p + min_run <= end:
        best, best_at = 0, -1
        starts = where.get(tuple(prompt[p : p + key]), [])
        first = bisect_left(starts, c_head)
        for c in starts[first : first + _CANDIDATES]:
            if cached[c : c + min_run] == prompt[p : p + min_run]:
                limit = min(len(cached) - c, end - p)
                n = min_run + _extent(cached, c + min_run, prompt, p + min_run, limit - min_run)
                if n > best:
                    best, best_at = n, c
        if best:
            runs.append(Run(best_at, p, best))
            c_head, p = best_at + best, p + best
        else:
            p += 1
    return runs


class RunFilter:
    """Rules out, cheaply, a cached sequence that shares no run of ``min_run`` tokens with
    ``prompt``: such a run holds whole one of the sequence's ``key``-token windows that start
    at a multiple of ``min_run - key + 1``, and every window of the prompt is in one set. A
    search over many cached sequences then indexes the prompt once, and aligns (see
    :func:`align`) only the sequences that may share a run."""

    def __init__(self, prompt: Sequence[int], min_run: int) -> None:
        self._prompt = prompt
        self._key = min(_KEY, min_run)
        self._stride = max(1, min_run - self._key + 1)
        self._windows: set[tuple[int, ...]] | None = None

    def may_share(self, cached: Sequence[int], floor: int) -> bool:
        """Whether ``cached[floor:]`` may share a run with the prompt (False: it does not)."""
        key, stride = self._key, self._stride
        if self._windows is None:
            prompt = self._prompt
            self._windows = {tuple(prompt[p : p + key]) for p in range(len(prompt) - key + 1)}
        windows = self._windows
        first = -(-floor // stride) * stride
        return any(
            tuple(cached[c : c + key]) in windows
            for c in range(first, len(cached) - key + 1, stride)
        )


def best_source(
    kept: Mapping[int, list[int]],
    movable: Mapping[int, list[int]],
    busy: list[list[int]],
    prompt: list[int],
    min_run: int,
    runs_filter: RunFilter | None = None,
) -> tuple[int | None, int, list[Run]]:
    """The kept sequence that serves most of ``prompt``: its id, the exact prefix it shares,
    and the runs of at least ``min_run`` tokens past that prefix that can be moved (only from
    ``movable`` sequences, holding no image; 0 turns moving off). ``busy`` are the token lists
    of the running sequences. A kept sequence whose runs are moved is used up by the request,
    so runs are taken only when they are most of what it holds past the prefix. A search
    calling this for many sequences passes one ``runs_filter`` of the prompt to all."""
    best: tuple[int, int | None, int, list[Run]] = (0, None, 0, [])
    if min_run and runs_filter is None:
        runs_filter = RunFilter(prompt, min_run)
    for seq, tokens in kept.items():
        n = common_prefix(tokens, prompt, len(prompt) - 1)
        runs: list[Run] = []
        if min_run and seq in movable and len(tokens) - n >= min_run and min(tokens) >= 0:
            # Cells are shared only over a common prefix of tokens, and a shift moves a cell
            # for every sequence holding it: no run starts before the last shared cell.
            others = [t for s, t in kept.items() if s != seq] + busy
            floor = max([n] + [common_prefix(t, tokens, len(tokens)) for t in others])
            assert runs_filter is not None
            if runs_filter.may_share(tokens, floor):
                runs = align(tokens, prompt, n, floor, min_run, len(prompt) - 1)
                # Moving runs uses up the kept sequence (its cells leave for the new request):
                # worth it only when it keeps more tokens than that sequence loses.
                moved = sum(r.n for r in runs)
                if moved < len(tokens) - n - moved:
                    runs = []
        total = n + sum(r.n for r in runs)
        if total > best[0]:
            best = (total, seq, n, runs)
    return best[1:]


def served(
    kept: Mapping[int, list[int]],
    movable: Mapping[int, list[int]],
    prompt: list[int],
    min_run: int,
    runs_filter: RunFilter | None = None,
) -> int:
    """How many of ``prompt``'s tokens the kept sequence that serves most of it serves: its
    exact prefix and the runs it would move (see :func:`best_source`, nothing running)."""
    _, shared, runs = best_source(kept, movable, [], prompt, min_run, runs_filter)
    return shared + sum(r.n for r in runs)


def prepare_hold(mem: llama_cpp.llama_memory_t, hold: int, start: int, runs: list[Run]) -> None:
    """Leave in sequence ``hold`` only the cells of ``runs``, moved to their new positions.
    The cells past ``start`` that ``hold`` shares with another sequence must not be in a run
    (a shift moves a cell for every sequence holding it)."""
    llama_cpp.llama_memory_seq_rm(mem, hold, 0, start)
    at = start
    for run in runs:
        llama_cpp.llama_memory_seq_rm(mem, hold, at, run.old)
        at = run.old + run.n
    llama_cpp.llama_memory_seq_rm(mem, hold, at, -1)
    # Runs moving left go first from the left, then runs moving right from the right: no run
    # then lands on cells another run still occupies.
    left = [r for r in runs if r.new < r.old]
    right = [r for r in runs if r.new > r.old]
    for run in left + right[::-1]:
        llama_cpp.llama_memory_seq_add(mem, hold, run.old, run.old + run.n, run.new - run.old)


def attach(mem: llama_cpp.llama_memory_t, hold: int, seq: int, run: Run) -> None:
    """Give ``run``'s cells (already at their new positions) from ``hold`` to ``seq``."""
    llama_cpp.llama_memory_seq_cp(mem, hold, seq, run.new, run.new + run.n)
    llama_cpp.llama_memory_seq_rm(mem, hold, run.new, run.new + run.n)

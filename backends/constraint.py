"""Constrained decoding with llguidance, the one grammar engine for every backend.

A constraint masks the logits of each step to the tokens that keep the output inside the
grammar. Both backends build the same llguidance tokenizer view of their vocabulary, so the
same grammar allows the same tokens on either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask


class GrammarError(ValueError):
    """The grammar cannot be enforced; the message says which part."""


class GrammarConstraint:
    """One request's grammar state: feed it the tokens sampled so far, get the allowed set."""

    def __init__(self, matcher: LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bitmask = allocate_token_bitmask(1, vocab_size)
        self.consumed = 0

    def advance(self, token: int) -> None:
        """The token sampled at the step just masked."""
        self._matcher.consume_token(token)
        self.consumed += 1

    def mask_inplace(self, logits: np.ndarray) -> None:
        """Set every token the grammar forbids to -inf in a contiguous logits vector."""
        logits[self._bits(logits.shape[-1], forbidden=True)] = -np.inf

    def allowed(self, size: int) -> np.ndarray:
        """A boolean mask over ``size`` logits (tokens past the tokenizer's are never allowed)."""
        return self._bits(size, forbidden=False)

    def _bits(self, size: int, *, forbidden: bool) -> np.ndarray:
        fill_next_token_bitmask(self._matcher, self._bitmask)
        # Unpacking the inverted words gives the forbidden set directly, without a pass over
        # the whole vocabulary to invert it.
        words = ~self._bitmask if forbidden else self._bitmask
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").view(bool)
        if bits.size < size:
            bits = np.concatenate([bits, np.full(size - bits.size, forbidden)])
        return bits[:size]


class GrammarCache:
    """An engine's llguidance tokenizer (built once, on first use) and its compiled grammars."""

    def __init__(self, make_tokenizer: Callable[[], LLTokenizer], vocab_size: int) -> None:
        self._make_tokenizer = make_tokenizer
        self._tokenizer: LLTokenizer | None = None
        self._vocab_size = vocab_size
        self._matchers: dict[str, LLMatcher] = {}
        self._lock = threading.Lock()

    def tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            return self._tokenizer

    def constraint(self, grammar: str) -> GrammarConstraint:
        """A fresh constraint for ``grammar`` (an llguidance grammar string)."""
        tokenizer = self.tokenizer()
        with self._lock:
            prototype = self._matchers.get(grammar)
        if prototype is None:
            prototype = LLMatcher(tokenizer, grammar, log_level=0)
            if prototype.is_error():
                raise GrammarError(prototype.get_error())
            with self._lock:
                if len(self._matchers) > 256:
                    self._matchers.clear()
                self._matchers[grammar] = prototype
        return GrammarConstraint(prototype.deep_copy(), self._vocab_size)

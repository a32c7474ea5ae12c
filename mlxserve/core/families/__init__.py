"""Model families: how each family of models is asked for tools and reasoning, and how its
replies are read back. A family is data plus one parser, chosen once per loaded model from its
chat template (and config), used by the core's output pipeline for every dialect and format.

How to add a family
===================

1. Write one module ``mlxserve/core/families/<family>.py`` with a subclass of
   :class:`~mlxserve.core.families.base.Family`. Set its class attributes and override only
   what differs from the defaults:

   - ``matches(template, config)``: True when a chat template (its Jinja source) and the
     model's config facts (``{"architecture": ...}``) are this family's. Test for markers only
     this family's templates contain.
   - ``think`` (start, end tags) and ``think_switch`` (the template variable that turns
     thinking on, e.g. ``enable_thinking``); or override ``reasoning_options`` /
     ``reasoning_kwargs`` for levels or a system-prompt switch. A setting the model cannot
     honour raises :class:`~mlxserve.errors.InvalidRequest` (a 400 in every dialect).
   - ``markers``: every control marker of the family (call, reasoning, turn markers). The
     parser sees them even where the vocabulary marks them special, and none ever reaches
     content. ``end_tokens`` / ``not_end_tokens``: turn-ending tokens to add to (or take out of)
     the tokenizer's own end-of-sequence ids.
   - ``call_syntax(functions)``: a :class:`~mlxserve.core.families.calls.BlockSyntax` (open and
     close markers, and ``parse(body) -> [(name, arguments dict)]``, raising ``UnreadableCall``
     for what it cannot read). Use a maintained parser where one exists (mlx-lm's
     ``mlx_lm.tool_parsers``, imported lazily inside ``parse``); where you write your own,
     say why in the module docstring.
   - ``call_grammar(functions, parallel, lit)``: a Lark grammar (llguidance dialect) for a
     reply that is nothing but calls in the family's own syntax. Write markers with
     ``lit(marker)`` (the marker's single token where the vocabulary has one). A schema part
     the syntax cannot force raises ``InvalidRequest`` naming the keyword.
   - ``prepare_messages(messages)`` when the template wants history in another shape
     (``tool_calls`` arguments are dicts, reasoning is ``reasoning_content``).
   - ``takes_tools`` / ``tool_prompt`` when the template does not render ``tools``.
   - ``parser(...)`` only for a format that is not "reasoning tags, then call blocks" (see
     ``harmony.py``).
2. Add an instance to ``FAMILIES`` below, before any family whose ``matches`` would also accept
   its templates (the first match wins).
3. Tests: parser cases on recorded output shapes (``tests/test_families.py`` shows the helpers:
   whole, one character and one token at a time, malformed, truncated), a grammar check, and
   the family's rows in the end-to-end test and in the README's family table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from mlxserve.core.families.base import Family, OutputParser, ReasoningOptions
from mlxserve.core.families.deepseek import DeepSeek, DeepSeekV32
from mlxserve.core.families.gemma import Gemma4, GemmaPlain
from mlxserve.core.families.glm import GLM, GLM47
from mlxserve.core.families.harmony import Harmony
from mlxserve.core.families.hermes import Hermes
from mlxserve.core.families.llama3 import Llama3
from mlxserve.core.families.lmstudio import LMStudio
from mlxserve.core.families.mistral import Mistral, MistralV11
from mlxserve.core.families.others import LFM2, KimiK2, MiniMaxM2
from mlxserve.core.families.qwen3_coder import Qwen3Coder

__all__ = [
    "FAMILIES",
    "Family",
    "LoadedFamily",
    "OutputParser",
    "ReasoningOptions",
    "detect_family",
    "load_family",
]

# Most specific first; the first family whose ``matches`` accepts a template is the model's.
FAMILIES: tuple[Family, ...] = (
    Harmony(),
    DeepSeekV32(),
    DeepSeek(),
    GLM(),
    GLM47(),
    Qwen3Coder(),
    Gemma4(),
    KimiK2(),
    MiniMaxM2(),
    LFM2(),
    Hermes(),
    MistralV11(),
    Mistral(),
    Llama3(),
    GemmaPlain(),
)
# A template that takes tools but shows no family's markers: most such models were trained on
# Hermes-style calls.
_GENERIC_TOOLS = Hermes()
_NO_TOOLS = LMStudio()


@lru_cache(maxsize=64)
def _detect(template: str, config_json: str) -> Family:
    config = json.loads(config_json)
    for family in FAMILIES:
        if family.matches(template, config):
            return family
    return _GENERIC_TOOLS if "tools" in template else _NO_TOOLS


def detect_family(template: str | None, config: Mapping[str, Any] | None = None) -> Family:
    """The family of a model with this chat template source and config facts."""
    return _detect(template or "", json.dumps(dict(config or {}), sort_keys=True, default=str))


@dataclass
class LoadedFamily:
    """A family bound to one loaded model's vocabulary: which of its markers are single
    tokens there (so the parser sees them and grammars can name them)."""

    family: Family
    template: str
    marker_ids: dict[int, str] = field(default_factory=dict)
    end_ids: frozenset[int] = frozenset()
    not_end_ids: frozenset[int] = frozenset()

    def lit(self, marker: str) -> str:
        ids = [i for i, text in self.marker_ids.items() if text == marker]
        return f"<[{ids[0]}]>" if ids else json.dumps(marker)

    def stop_ids(self, eos: frozenset[int]) -> frozenset[int]:
        return (eos | self.end_ids) - self.not_end_ids

    def token_bytes(self, token_bytes: Callable[[int], bytes]) -> Callable[[int], bytes]:
        """The engine's token decoder, with the family's markers shown as their text."""
        if not self.marker_ids:
            return token_bytes
        shown = {i: t.encode() for i, t in self.marker_ids.items()}
        return lambda token: shown.get(token) or token_bytes(token)


def load_family(
    template: str, config: Mapping[str, Any], tokenize: Callable[[str], list[int]]
) -> LoadedFamily:
    """The model's family, with its markers looked up in the model's vocabulary."""
    family = detect_family(template, config)

    def single(texts: tuple[str, ...]) -> dict[int, str]:
        found = {}
        for text in texts:
            ids = tokenize(text)
            if len(ids) == 1:
                found[ids[0]] = text
        return found

    return LoadedFamily(
        family,
        template,
        marker_ids=single(family.markers),
        end_ids=frozenset(single(family.end_tokens)),
        not_end_ids=frozenset(single(family.not_end_tokens)),
    )

"""Agent replay for scripts/bench.py: a scripted coding-agent session sent turn by turn.

Every turn resends the whole session the way Claude Code (``/v1/messages``) and Codex
(``/v1/responses``) do: a ≈6k-token system prompt and tool list whose ``<env>`` header line
near the top changes every turn (working directory, date and turn number), then the task and
every earlier turn's tool call and tool result (a few hundred tokens each). The assistant's
turns are scripted, not sampled: each request asks for one token, so its time is the prefill.

Per format and protocol it reports, from each reply's usage, the fraction of prompt tokens
served from the prompt cache from turn 2 on (``cache_read_input_tokens``,
``input_tokens_details.cached_tokens``) and the whole session's request time ÷ the same
session on a cold server (``--prompt-cache-bytes 0``), for the server as main configures it
and with ``--cache-reuse 0`` (exact prefix reuse only).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from bench_common import (
    fmt_table,
    machine,
    our_server,
    print_timings,
    stream_once,
    targets,
    timed,
)

TURNS = 20
# Calibrated on Qwen2's tokenizer: ≈4.6k tokens of instructions, ≈1.5k of tools (turn 1: ≈6.1k).
SYSTEM_WORDS = 3400
RESULT_WORDS = 260
TOOL_DESCRIPTION_WORDS = 70

_VOCABULARY = (
    "the file project build test module function value error change line branch commit "
    "review request server client model token cache prompt system tool result output input "
    "config option path folder source target check run step state event stream reply turn "
    "agent task plan edit read write search list show open close start stop load save parse "
    "render format schema field type name key index count size limit range order first last "
    "next previous before after always never only every some each other same new old small "
    "large short long fast slow safe clear exact simple careful local remote public private "
    "update create delete rename move copy merge split join sort filter map reduce return "
    "call handle raise catch retry wait poll lock queue batch chunk frame layer block group "
    "user team owner guide rule note issue patch diff hunk log trace report table column row"
)
_WORDS = _VOCABULARY.split()

_TOOLS = (
    ("Bash", "command", "Runs a shell command in the working directory and returns its output"),
    ("Read", "file_path", "Reads a file from the local filesystem with line numbers"),
    ("Edit", "file_path", "Replaces an exact string in a file with another string"),
    ("Write", "file_path", "Writes a whole file, replacing what was there"),
    ("Glob", "pattern", "Lists the files whose paths match a glob pattern"),
    ("Grep", "pattern", "Searches file contents with a regular expression"),
    ("WebFetch", "url", "Fetches a web page and returns its text"),
    ("TodoWrite", "todos", "Keeps the task list of this session up to date"),
    ("Task", "prompt", "Starts a sub-agent on a self-contained part of the task"),
    ("NotebookEdit", "notebook_path", "Edits one cell of a Jupyter notebook"),
    ("LS", "path", "Lists a directory"),
    ("ExitPlanMode", "plan", "Presents the plan to the user for approval"),
)


def _text(seed: str, words: int) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(words):
        out.append(rng.choice(_WORDS))
        if i % 14 == 13:
            out.append(".\n" if i % 70 == 69 else ".")
    return " ".join(out)


def _tools() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(name, argument, description, JSON schema) of each tool."""
    tools = []
    for name, arg, summary in _TOOLS:
        description = f"{summary}. " + _text(f"tool-{name}", TOOL_DESCRIPTION_WORDS)
        schema = {
            "type": "object",
            "properties": {
                arg: {"type": "string", "description": f"The {arg} to use."},
                "timeout": {"type": "integer", "description": "Milliseconds before giving up."},
                "description": {"type": "string", "description": "What this call does."},
            },
            "required": [arg],
        }
        tools.append((name, arg, description, schema))
    return tools


def system_prompt(session: str, turn: int) -> str:
    """The agent's instructions, with the header line that changes every turn near the top."""
    env = (
        "<env>\n"
        f"Working directory: /home/dev/{session}/turn-{turn}\n"
        f"Today's date: 2026-12-06 10:{turn:02d}:00 UTC (turn {turn})\n"
        "</env>"
    )
    intro = "You are an interactive coding agent. Use the tools to help the user with the task."
    return f"{intro}\n{env}\n\n{_text('system', SYSTEM_WORDS)}"


def _call(turn: int) -> tuple[str, dict[str, Any]]:
    name, arg, _, _ = _TOOLS_CACHE[turn % len(_TOOLS_CACHE)]
    return name, {arg: f"src/module_{turn}.py", "description": f"step {turn} of the task"}


def _result(turn: int) -> str:
    return _text(f"result-{turn}", RESULT_WORDS)


_TOOLS_CACHE = _tools()
TASK = "Fix the failing test in the build module, then run the whole test suite and report."


def messages_body(model: str, session: str, turn: int) -> dict[str, Any]:
    """Turn ``turn`` (1-based) of the session as an Anthropic Messages request."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"[{session}] {TASK}"}]
    for j in range(1, turn):
        name, args = _call(j)
        call_id = f"toolu_{session}_{j:03d}"
        messages.append(
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": call_id, "name": name, "input": args}],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call_id, "content": _result(j)}],
            }
        )
    tools = [{"name": n, "description": d, "input_schema": s} for n, _, d, s in _TOOLS_CACHE]
    return {
        "model": model,
        "system": system_prompt(session, turn),
        "tools": tools,
        "messages": messages,
        "max_tokens": 1,
        "temperature": 0,
    }


def responses_body(model: str, session: str, turn: int) -> dict[str, Any]:
    """Turn ``turn`` (1-based) of the session as a Responses request (Codex's shape)."""
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": f"[{session}] {TASK}"}
    ]
    for j in range(1, turn):
        name, args = _call(j)
        call_id = f"call_{session}_{j:03d}"
        items.append(
            {
                "type": "function_call",
                "call_id": call_id,
                "name": name,
                "arguments": json.dumps(args),
            }
        )
        items.append({"type": "function_call_output", "call_id": call_id, "output": _result(j)})
    tools = [
        {"type": "function", "name": n, "description": d, "parameters": s}
        for n, _, d, s in _TOOLS_CACHE
    ]
    return {
        "model": model,
        "instructions": system_prompt(session, turn),
        "tools": tools,
        "input": items,
        "max_output_tokens": 1,
        "temperature": 0,
        "store": False,
    }


@dataclass
class Turn:
    prompt_tokens: int
    cached_tokens: int
    seconds: float


def _usage(protocol: str, body: dict[str, Any]) -> tuple[int, int]:
    usage = body["usage"]
    if protocol == "messages":
        read = usage.get("cache_read_input_tokens") or 0
        written = usage.get("cache_creation_input_tokens") or 0
        return usage["input_tokens"] + read + written, read
    details = usage.get("input_tokens_details") or {}
    return usage["input_tokens"], details.get("cached_tokens") or 0


async def replay(url: str, model: str, protocol: str, session: str, turns: int) -> list[Turn]:
    """The session's turns sent one after the other; each turn's prompt size, cached part
    and request time."""
    path, build = (
        ("/v1/messages", messages_body)
        if protocol == "messages"
        else ("/v1/responses", responses_body)
    )
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        for turn in range(1, turns + 1):
            body = build(model, session, turn)
            t0 = time.perf_counter()
            r = await client.post(path, json=body)
            seconds = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"{protocol} turn {turn}: {r.status_code} {r.text[:300]}")
            prompt, cached = _usage(protocol, r.json())
            out.append(Turn(prompt, cached, seconds))
    return out


def summary(turns: list[Turn]) -> dict[str, float]:
    later = turns[1:]
    return {
        "turn1_prompt_tokens": turns[0].prompt_tokens,
        "last_prompt_tokens": turns[-1].prompt_tokens,
        "cached_fraction_from_turn2": (
            sum(t.cached_tokens for t in later) / max(1, sum(t.prompt_tokens for t in later))
        ),
        "seconds": sum(t.seconds for t in turns),
        "median_turn_seconds": statistics.median(t.seconds for t in turns),
    }


# The context the replay loads its model with: enough for 20 turns (≈12.5k tokens at the
# last). The generated model declares 32k.
REPLAY_CONTEXT = 16384
MODEL_CONTEXT = 32768


async def agent_replay(args: argparse.Namespace) -> dict[str, Any]:
    """The agent replay per format and protocol, each on a fresh server (a new home, so no
    entry of another run is found, in memory or spilled to disk) configured three ways: as
    main configures the prompt cache, with ``--cache-reuse 0``, and with the prompt cache off
    (the cold baseline)."""
    root, found = targets(args, args.replay_size, None if args.model else MODEL_CONTEXT)
    variants = {
        "main": (),
        "cache-reuse 0": ("--cache-reuse", "0"),
        "cold": ("--prompt-cache-bytes", "0"),
    }
    protocols = ("messages", "responses")
    runs: dict[str, dict[str, dict[str, list[Any]]]] = {}
    timings: dict[str, float] = {}
    for fmt, target in found.items():
        runs[fmt] = {}
        for variant, flags in variants.items():
            for protocol in protocols:
                home = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
                ours = our_server(root, home, target.key, *flags, context=REPLAY_CONTEXT)
                try:
                    ours.start(home)
                    async with httpx.AsyncClient(timeout=600) as client:
                        await stream_once(client, ours, "warm up", 2)  # loads the model
                    session = f"{protocol}-{variant.replace(' ', '')}"
                    with timed(timings, f"{fmt} {variant} {protocol}"):
                        turns = await replay(ours.url, target.key, protocol, session, args.turns)
                    runs[fmt].setdefault(protocol, {})[variant] = turns
                finally:
                    ours.stop()
    rows: list[tuple[str, str, str]] = []
    figures: dict[str, Any] = {}
    for fmt, by_protocol in runs.items():
        for protocol, by_variant in by_protocol.items():
            cold = summary(by_variant["cold"])
            rows.append(
                (
                    f"{fmt} {protocol} prompt tokens turn 1 / {args.turns}",
                    f"{cold['turn1_prompt_tokens']:.0f}/{cold['last_prompt_tokens']:.0f}",
                    "≈6k at turn 1",
                )
            )
            rows.append((f"{fmt} {protocol} cold seconds", f"{cold['seconds']:.1f}", "reported"))
            for variant in ("main", "cache-reuse 0"):
                warm = summary(by_variant[variant])
                warm["time_vs_cold"] = warm["seconds"] / cold["seconds"]
                figures[f"{fmt} {protocol} {variant}"] = warm
                name = f"{fmt} {protocol} {variant}"
                rows.append(
                    (
                        f"{name} cached from turn 2",
                        f"{warm['cached_fraction_from_turn2']:.3f}",
                        ">= 0.90",
                    )
                )
                rows.append((f"{name} time ÷ cold", f"{warm['time_vs_cold']:.3f}", "<= 0.25"))
            figures[f"{fmt} {protocol} cold"] = cold
    print(fmt_table(rows))
    print_timings(timings)
    return {
        "mode": "agent-replay",
        "machine": machine(),
        "figures": figures,
        "turns": {
            fmt: {p: {v: [asdict(t) for t in ts] for v, ts in bv.items()} for p, bv in bp.items()}
            for fmt, bp in runs.items()
        },
        "timings": timings,
    }

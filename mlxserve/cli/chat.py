"""``mlxserve chat`` (an interactive terminal chat) and ``mlxserve log stream``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from typing import Any

from mlxserve.cli.http import Client, CliError, ServerRefused

HELP = "Type a message and press Enter. /clear forgets the conversation, /exit (or Ctrl-D) quits."


def _pick_model(client: Client, model: str | None) -> str:
    if model:
        return model
    loaded = client.get("/api/v1/models/loaded")["instances"]
    llms = [i["id"] for i in loaded if i.get("type", "llm") == "llm"]
    if not llms:
        raise CliError(
            "No model is loaded: name one (`mlxserve chat <model>`, see `mlxserve ls`) or "
            "load one first (`mlxserve load <model>`).",
            2,
        )
    return str(llms[0])


def _read(prompt: str, interactive: bool) -> str | None:
    try:
        if interactive:
            return input(prompt)
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except EOFError:
        return None


def chat(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    client = Client.from_args(args)
    if client.is_up() is None:
        raise client.not_running()
    model = _pick_model(client, args.model)
    interactive = sys.stdin.isatty()
    err = Console(stderr=True, highlight=False)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    err.print(f"[bold]Chatting with {escape(model)}.[/bold] {HELP}")
    while True:
        text = _read("\n>>> " if interactive else "", interactive)
        if text is None or text.strip() in ("/exit", "/quit", "/bye"):
            break
        if not text.strip():
            continue
        if text.strip() == "/clear":
            history.clear()
            err.print("[dim]Conversation cleared.[/dim]")
            continue
        if not interactive:
            print(f">>> {text}")
        history.append({"role": "user", "content": text})
        body: dict[str, Any] = {
            "model": model,
            "messages": [*system, *history],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if args.max_tokens is not None:
            body["max_tokens"] = args.max_tokens
        if args.temperature is not None:
            body["temperature"] = args.temperature
        try:
            reply, stats = _stream_reply(client, body)
        except ServerRefused as exc:
            # One failed reply (a context overflow, say) need not end the session; the turn
            # is dropped so the next one does not resend it.
            history.pop()
            err.print(f"[red]error:[/red] {escape(_printable(exc.message))}")
            continue
        history.append({"role": "assistant", "content": reply})
        err.print(f"[dim]{stats}[/dim]")
    return 0


def _stream_reply(client: Client, body: dict[str, Any]) -> tuple[str, str]:
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    completion_tokens = 0
    thinking = False
    try:
        for event in client.stream_events("POST", "/v1/chat/completions", body):
            if "error" in event:
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise ServerRefused(str(message))
            usage = event.get("usage")
            if isinstance(usage, dict):
                completion_tokens = int(usage.get("completion_tokens") or 0)
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                content = delta.get("content")
                if reasoning or content:
                    first = first or time.perf_counter()
                if reasoning:
                    if not thinking:
                        sys.stdout.write("\x1b[2m" if sys.stdout.isatty() else "<think>")
                        thinking = True
                    sys.stdout.write(reasoning)
                if content:
                    if thinking:
                        sys.stdout.write("\x1b[0m\n" if sys.stdout.isatty() else "</think>\n")
                        thinking = False
                    sys.stdout.write(content)
                    parts.append(content)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n[interrupted]")
    if thinking and sys.stdout.isatty():
        sys.stdout.write("\x1b[0m")
    sys.stdout.write("\n")
    sys.stdout.flush()
    ended = time.perf_counter()
    generating = ended - (first or started)
    rate = completion_tokens / generating if generating > 0 and completion_tokens else 0.0
    ttft = (first or ended) - started
    stats = f"{completion_tokens} tokens · {rate:.1f} tok/s · first token {ttft:.2f}s"
    return "".join(parts), stats


# C0 and C1 control characters and DEL: a logged path or body could otherwise move the
# cursor, retitle the window or rewrite earlier lines of the terminal (rich keeps them).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _clip(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = _printable(text.replace("\n", "\\n"))
    return text if len(text) <= limit else text[:limit] + "…"


def log_stream(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    client = Client.from_args(args)
    out = Console(highlight=False, soft_wrap=True)
    if not args.json:
        Console(stderr=True).print(f"[dim]Streaming logs from {client.url} (Ctrl-C to stop)…[/dim]")
    try:
        for event in client.stream_events("GET", "/api/v1/logs/stream"):
            if event.get("type") == "log.start":
                continue
            if args.json:
                print(json.dumps(event, ensure_ascii=False), flush=True)
                continue
            when = dt.datetime.fromtimestamp(float(event.get("timestamp", time.time())))
            stamp = when.strftime("%H:%M:%S")
            if event.get("type") == "request":
                body = "" if event.get("body") is None else " " + _clip(event["body"], args.width)
                method = escape(_printable(str(event["method"])))
                path = escape(_printable(str(event["path"])))
                out.print(
                    f"[dim]{stamp}[/dim] [cyan]→ #{event['id']} {method} {path}[/cyan]"
                    f"{escape(body)}",
                    markup=True,
                )
            elif event.get("type") == "response":
                colour = "green" if int(event.get("status", 0)) < 400 else "red"
                body = "" if event.get("body") is None else " " + _clip(event["body"], args.width)
                out.print(
                    f"[dim]{stamp}[/dim] [{colour}]← #{event['id']} {event['status']} "
                    f"({event.get('duration_ms')} ms)[/{colour}]{escape(body)}",
                    markup=True,
                )
    except KeyboardInterrupt:
        return 0
    raise CliError("The server closed the log stream.")

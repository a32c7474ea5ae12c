"""``mlxserve ls|ps|load|unload|get|search|rm``: models on disk and in the running server."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from mlxserve.cli.http import Client, CliError, human_size

POLL_SECONDS = 0.25


def print_table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in header:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        # Piped output is read by scripts and people alike: never wrap a row.
        console = Console(width=1000)
    console.print(table)


def ls(args: argparse.Namespace, settings: Any) -> int:
    from mlxserve.core.registry import Registry
    from mlxserve.core.sources import external_sources

    models = Registry(settings.models_root, external_sources(settings)).scan()
    if args.json:
        rows = [
            {
                "key": m.key,
                "type": m.type,
                "format": m.format,
                "architecture": m.architecture,
                "quantization": {"name": m.quantization, "bits_per_weight": m.bits_per_weight},
                "size_bytes": m.size_bytes,
                "params_string": m.params_string,
                "max_context_length": m.max_context_length,
                "trained_for_tool_use": m.trained_for_tool_use,
                "vision": m.vision,
                "source": m.source,
                "path": str(m.path),
            }
            for m in models
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not models:
        print(f"No models in {settings.models_root}.")
        print("Download one with `mlxserve get <publisher>/<model>`, or put MLX folders or GGUF")
        print("files there as <publisher>/<model>/..., LM Studio's layout.")
        return 0
    print_table(
        ("MODEL", "FORMAT", "SIZE", "PARAMS", "QUANT", "ARCH", "CONTEXT", "SOURCE"),
        [
            (
                m.key,
                m.format,
                human_size(m.size_bytes),
                m.params_string,
                m.quantization,
                f"{m.architecture} (vision)" if m.vision else m.architecture,
                str(m.max_context_length),
                m.source,
            )
            for m in models
        ],
    )
    total = sum(m.size_bytes for m in models)
    print(f"\n{len(models)} model{'s' if len(models) != 1 else ''}, {human_size(total)}.")
    return 0


def _ttl(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _status(pending: int, parallel: int | None) -> str:
    """idle, busy, or busy with how many requests wait for a free slot (LM Studio's queue)."""
    if not pending:
        return "idle"
    queued = pending - parallel if parallel else 0
    return f"busy, {queued} queued" if queued > 0 else "busy"


def ps(args: argparse.Namespace) -> int:
    instances = Client.from_args(args).get("/api/v1/models/loaded")["instances"]
    if args.json:
        print(json.dumps(instances, indent=2))
        return 0
    if not instances:
        print("No models are loaded. Load one with `mlxserve load <model>`.")
        return 0
    print_table(
        ("IDENTIFIER", "MODEL", "FORMAT", "CONTEXT", "PARALLEL", "TTL LEFT", "MEMORY", "STATUS"),
        [
            (
                i["id"],
                i["model"],
                i["format"],
                str(i["context_length"]),
                str((i.get("load_config") or {}).get("parallel", "-")),
                _ttl(i.get("ttl_left_seconds")),
                human_size(i.get("memory_bytes") or i.get("size_bytes") or 0),
                _status(i.get("pending") or 0, (i.get("load_config") or {}).get("parallel")),
            )
            for i in instances
        ],
    )
    return 0


def load(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.gpu not in (None, "max", "auto"):
        raise CliError(
            "mlxserve loads every layer on the GPU (Apple silicon shares its memory); --gpu "
            "accepts only 'max'.",
            2,
        )
    body: dict[str, Any] = {"model": args.model, "echo_load_config": True}
    options = ("context_length", "identifier", "ttl", "parallel", "kv_cache_quantization")
    for name in (*options, "cache_type_k", "cache_type_v", "draft_model"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    client = Client.from_args(args)
    if client.is_up() is None:
        # Fail before showing a spinner for a load that cannot happen.
        client.get("/health")
    console = Console(stderr=True)
    started = time.perf_counter()
    if console.is_terminal and not args.json:
        with console.status(f"Loading {args.model}…"):
            out = client.post("/api/v1/models/load", body, timeout=3600)
    else:
        out = client.post("/api/v1/models/load", body, timeout=3600)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    seconds = out.get("load_time_seconds", time.perf_counter() - started)
    config = out.get("load_config") or {}
    ctx = config.get("context_length")
    detail = f", context {ctx}" if ctx else ""
    if config.get("parallel"):
        detail += f", parallel {config['parallel']}"
    print(f"Loaded {args.model} as '{out['instance_id']}' in {seconds:.2f}s{detail}.")
    return 0


def unload(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    if args.all:
        ids = [i["id"] for i in client.get("/api/v1/models/loaded")["instances"]]
        if not ids:
            print("No models are loaded.")
            return 0
    elif args.identifier:
        ids = [args.identifier]
    else:
        raise CliError("Name the instance to unload (see `mlxserve ps`), or pass --all.", 2)
    for instance_id in ids:
        client.post("/api/v1/models/unload", {"instance_id": instance_id})
        if not args.json:
            print(f"Unloaded '{instance_id}'.")
    if args.json:
        print(json.dumps({"unloaded": ids}))
    return 0


def get(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    body: dict[str, Any] = {"model": args.model}
    if args.quantization:
        body["quantization"] = args.quantization
    started = client.post("/api/v1/models/download", body, timeout=120)
    if started["status"] == "already_downloaded":
        if args.json:
            print(json.dumps(started))
        else:
            print(f"{args.model} is already downloaded. `mlxserve ls` lists it.")
        return 0
    job_id = started["job_id"]
    try:
        status = _follow(client, job_id, args.json, started["total_size_bytes"])
    except KeyboardInterrupt:
        raise CliError(
            f"Stopped watching; the server goes on downloading {args.model} (job {job_id}).",
            130,
        ) from None
    if args.json:
        print(json.dumps(status, indent=2))
    if status["status"] != "completed":
        raise CliError(f"Download of {args.model} failed: {status.get('error', 'unknown error')}")
    if not args.json:
        print(
            f"Downloaded {status['model']} ({human_size(status['total_size_bytes'])}). "
            f"Load it with `mlxserve load {status.get('model_key') or status['model']}`."
        )
    return 0


def _follow(client: Client, job_id: str, quiet: bool, total: int) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    path = f"/api/v1/models/download/status/{job_id}"
    console = Console(stderr=True)
    if quiet:
        while (status := client.get(path))["status"] == "downloading":
            time.sleep(POLL_SECONDS)
        return dict(status)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    last_line = 0.0
    with progress:
        task = progress.add_task("Downloading", total=total)
        while True:
            status = client.get(path)
            progress.update(task, completed=status["downloaded_bytes"])
            if not console.is_terminal and time.monotonic() - last_line > 2:
                last_line = time.monotonic()
                pct = 100 * status["downloaded_bytes"] / max(total, 1)
                print(f"downloading: {pct:.0f}%", file=sys.stderr)
            if status["status"] != "downloading":
                return dict(status)
            time.sleep(POLL_SECONDS)


def search(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    query = {"q": args.query, "limit": str(args.limit)}
    if args.format:
        query["format"] = args.format
    found = client.request("GET", "/api/v1/models/search?" + urlencode(query), timeout=120)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found["data"]:
        print(f"No MLX or GGUF model on the hub matches '{args.query}'.")
        return 1
    rows: list[Sequence[str]] = []
    for model in found["data"]:
        for i, q in enumerate(model["quantizations"]):
            fits = {True: "yes", False: "no", None: "?"}[q["fits"]]
            name = model["id"] if i == 0 else ""
            get = model["id"] + (f"@{q['name']}" if model["format"] == "gguf" and q["name"] else "")
            rows.append(
                (name, model["format"] if i == 0 else "", f"{model['downloads']:,}" if i == 0
                 else "", q["name"] or "-", human_size(q["size_bytes"]), fits,
                 "downloaded" if q["downloaded"] else f"mlxserve get {get}")
            )  # fmt: skip
    print_table(("MODEL", "FORMAT", "DOWNLOADS", "QUANT", "SIZE", "FITS", "GET"), rows)
    return 0


def rm(args: argparse.Namespace, settings: Any) -> int:
    from mlxserve.core.registry import Registry

    registry = Registry(settings.models_root)
    matches = [m for m in registry.scan() if args.model in (m.key, m.name)]
    if not matches:
        from mlxserve.core.sources import external_sources

        others = Registry(settings.models_root, external_sources(settings)).scan()
        elsewhere = [m for m in others if args.model in (m.key, m.name)]
        if elsewhere:
            raise CliError(
                f"{elsewhere[0].key} lies in the {elsewhere[0].source} folder, which mlxserve "
                "only reads; delete it with the tool that downloaded it."
            )
    if len(matches) != 1:
        what = "several models" if matches else "no model"
        raise CliError(f"'{args.model}' names {what} in {settings.models_root}; see `mlxserve ls`.")
    info = matches[0]
    client = Client.from_args(args)
    if client.is_up() is not None:
        loaded = client.get("/api/v1/models/loaded")["instances"]
        # One quantization's files may be loaded under the folder's key, and the reverse.
        folder_key = info.key.partition("@")[0]
        if any(i["model"].partition("@")[0] == folder_key for i in loaded):
            raise CliError(f"{info.key} is loaded; unload it first (`mlxserve unload --all`).")
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("Pass --yes to delete without asking.", 2)
        answer = input(f"Delete {info.key} ({human_size(info.size_bytes)}) from disk? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing deleted.")
            return 1
    from mlxserve.core.deletion import remove_files

    remove_files(info)
    print(f"Deleted {info.key}.")
    return 0

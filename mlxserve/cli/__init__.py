"""The ``mlxserve`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from mlxserve import __version__
from mlxserve.cli import tokens


def _settings(args: argparse.Namespace) -> Any:
    from mlxserve.settings import Settings

    overrides: dict[str, Any] = {}
    # Every option whose destination is a setting overrides it (else the environment wins).
    names = Settings.model_fields
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if "cors_origins" in overrides:
        overrides["cors"] = True
    from pydantic import ValidationError

    from mlxserve.cli.http import CliError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        raise CliError(f"--{where.replace('_', '-')}: {error['msg']}", status=2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from mlxserve.app import create_app

    settings = _settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings.models_root.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("mlxserve")
    log.info("models directory: %s", settings.models_root)
    from mlxserve.http.shutdown import exit_zero_after_signal

    exit_zero_after_signal()
    if args.distributed is not None:
        return _serve_distributed(args.distributed, settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    return 0


def _serve_distributed(hostfile: str, settings: Any) -> int:
    """Rank 0 serves HTTP with models sharded across the group; the other ranks follow it."""
    import uvicorn

    from backends.mlx.distributed import DistributedFailure, make_group, serve_worker
    from mlxserve.app import create_app
    from mlxserve.distributed import HostfileError, launch, stop_workers

    workers = []
    try:
        if hostfile:
            workers = launch(Path(hostfile), settings)
        group = make_group(settings.distributed_backend, settings.distributed_timeout)
    except (HostfileError, DistributedFailure, RuntimeError) as exc:
        stop_workers(workers, grace=0)
        print(f"error: --distributed: {exc}", file=sys.stderr)
        return 2
    if group.rank != 0:
        import signal

        # No HTTP to drain here, and the main thread waits inside a collective, where a
        # Python signal handler would never run: a stop signal ends the rank at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        return serve_worker(group)
    logging.getLogger("mlxserve").info(
        "distributed: rank 0 of %d (%s backend)", group.size, group.backend
    )
    app = create_app(settings)
    app.state.mlxserve.manager.distributed = group
    group.start_monitor()
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            timeout_graceful_shutdown=5,
        )
    finally:
        group.stop()
        stop_workers(workers, grace=0 if group.failed else 10)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from mlxserve.cli import models

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return models.ls(args, _settings(args))


def cmd_rm(args: argparse.Namespace) -> int:
    from mlxserve.cli import models

    return models.rm(args, _settings(args))


def _lazy(module: str, name: str) -> Any:
    """A command function imported only when that command runs (``--help`` stays instant)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        result: int = getattr(importlib.import_module(f"mlxserve.cli.{module}"), name)(args)
        return result

    return run


def tuning_flags(p: argparse.ArgumentParser) -> tuple[str, ...]:
    """Settings that are a plain number and have no flag of their own on ``p``: each is
    offered as ``--name-with-dashes``, so a new numeric setting is one line in Settings."""
    from mlxserve.settings import Settings

    taken = {a.dest for a in p._actions}
    return tuple(
        name
        for name, field in Settings.model_fields.items()
        if field.annotation in (int, float) and name not in taken
    )


def _setting_flags(p: argparse.ArgumentParser) -> None:
    from mlxserve.settings import Settings

    group = p.add_argument_group("tuning (each also MLXSERVE_<NAME>)")
    for name in tuning_flags(p):
        field = Settings.model_fields[name]
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=float if field.annotation is float else int,
            metavar="SECONDS"
            if name.endswith(("_seconds", "_timeout"))
            else "DAYS"
            if name.endswith("_days")
            else "N",
            help=f"default {field.default}; env MLXSERVE_{name.upper()}",
        )


def _source_options(p: argparse.ArgumentParser) -> None:
    sources = p.add_argument_group("models people already have (read-only)")
    sources.add_argument(
        "--no-lmstudio-models",
        dest="lmstudio_models",
        action="store_const",
        const=False,
        help="do not serve LM Studio's downloaded models",
    )
    sources.add_argument(
        "--lmstudio-models-dir",
        type=Path,
        metavar="DIR",
        help="LM Studio's models folder (default: the one its settings name, ~/.lmstudio/models)",
    )
    sources.add_argument(
        "--no-hf-cache-models",
        dest="hf_cache_models",
        action="store_const",
        const=False,
        help="do not serve MLX and GGUF models from the Hugging Face cache",
    )
    sources.add_argument(
        "--hf-cache-dir",
        type=Path,
        metavar="DIR",
        help="the Hugging Face hub cache (default: $HF_HUB_CACHE, ~/.cache/huggingface/hub)",
    )


def _add_client_commands(sub: Any, models_dir_option: Any) -> None:
    """``lms``'s verbs: they talk to a running server over HTTP."""
    from mlxserve.cli.http import client_options

    server = sub.add_parser("server", help="start, stop or inspect the background server")
    server_sub = server.add_subparsers(dest="server_command", metavar="ACTION", required=True)
    start = server_sub.add_parser(
        "start",
        help="start the server in the background",
        description="Start `mlxserve serve` in the background and return once it answers. "
        "Any other `mlxserve serve` option (--models-dir, --cors, --require-auth, --no-jit, "
        "--ttl, ...) is passed on to it. Its pid and log live under $MLXSERVE_HOME.",
    )
    start.add_argument("--host", help="address to bind (default 127.0.0.1)")
    start.add_argument("--port", type=int, help="port to bind (default 1234)")
    start.add_argument("--json", action="store_true", help="machine-readable output")
    start.set_defaults(func=None, server_start=True)
    stop = server_sub.add_parser("stop", help="stop the server `server start` started")
    client_options(stop, json_flag=False)
    stop.set_defaults(func=_lazy("server", "stop"))
    status = server_sub.add_parser("status", help="is the server running, and what is loaded")
    client_options(status)
    status.set_defaults(func=_lazy("server", "status"))

    ps = sub.add_parser(
        "ps", help="list the loaded models (context, parallel, TTL left, memory, queue)"
    )
    client_options(ps)
    ps.set_defaults(func=_lazy("models", "ps"))

    load = sub.add_parser("load", help="load a model into the running server")
    load.add_argument("model", help="model key (publisher/model, see `mlxserve ls`)")
    load.add_argument("--context-length", type=int, help="context length to load it with")
    load.add_argument("--identifier", help="instance id to give it (default: the model key)")
    load.add_argument("--ttl", type=float, metavar="SECONDS", help="unload after idle seconds")
    load.add_argument("--gpu", help="GPU offload; MLX and Metal always use 'max'")
    load.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="requests it decodes at once (GGUF parallel sequences, MLX batch size)",
    )
    load.add_argument(
        "--kv-cache-quantization",
        type=int,
        choices=(2, 3, 4, 6, 8),
        metavar="BITS",
        help="quantize an MLX model's KV cache to 2, 3, 4, 6 or 8 bits",
    )
    load.add_argument(
        "--draft-model",
        metavar="MODEL",
        help="default draft model for speculative decoding (same format and vocabulary)",
    )
    for side in ("k", "v"):
        load.add_argument(
            f"--cache-type-{side}",
            metavar="TYPE",
            help=f"llama.cpp {side.upper()}-cache type for a GGUF model (f16, q8_0, q4_0, ...)",
        )
    client_options(load)
    load.set_defaults(func=_lazy("models", "load"))

    unload = sub.add_parser("unload", help="unload a loaded model instance")
    unload.add_argument("identifier", nargs="?", help="instance id (see `mlxserve ps`)")
    unload.add_argument("--all", action="store_true", help="unload every loaded model")
    client_options(unload)
    unload.set_defaults(func=_lazy("models", "unload"))

    get = sub.add_parser(
        "get",
        help="download a model from Hugging Face (through the server)",
        description="Download a model: a Hugging Face repository (mlx-community/Qwen3-0.6B-4bit), "
        "its URL, or publisher/model@Q4_K_M for one quantization of a GGUF repository. The "
        "server downloads it (HF_ENDPOINT names another hub) into its models directory.",
    )
    get.add_argument("model")
    get.add_argument("--quantization", help="GGUF quantization to fetch (e.g. Q4_K_M)")
    client_options(get)
    get.set_defaults(func=_lazy("models", "get"))

    search = sub.add_parser(
        "search",
        help="search Hugging Face for MLX and GGUF models (through the server)",
        description="The most downloaded MLX and GGUF repositories whose names hold QUERY, "
        "with the quantizations each offers, their sizes and whether each fits this machine's "
        "memory. Download one with `mlxserve get`.",
    )
    search.add_argument("query")
    search.add_argument("--format", choices=["mlx", "gguf"], help="only this format")
    search.add_argument("--limit", type=int, default=20, help="results (1-50, default 20)")
    client_options(search)
    search.set_defaults(func=_lazy("models", "search"))

    rm = sub.add_parser("rm", help="delete a downloaded model from disk")
    rm.add_argument("model", help="model key (see `mlxserve ls`)")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    models_dir_option(rm)
    client_options(rm, json_flag=False)
    rm.set_defaults(func=cmd_rm)

    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("model", nargs="?", help="model key or instance id (default: first loaded)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-tokens", type=int, help="longest reply, in tokens")
    chat.add_argument("--temperature", type=float, help="sampling temperature")
    client_options(chat, json_flag=False)
    chat.set_defaults(func=_lazy("chat", "chat"))

    log = sub.add_parser("log", help="follow the server's requests and responses")
    log_sub = log.add_subparsers(dest="log_command", metavar="ACTION", required=True)
    stream = log_sub.add_parser("stream", help="print requests and responses as they happen")
    stream.add_argument("--width", type=int, default=200, help="characters of each body shown")
    client_options(stream)
    stream.set_defaults(func=_lazy("chat", "log_stream"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxserve",
        description="An MLX-first local model server (MLX and GGUF models, OpenAI API).",
    )
    parser.add_argument("--version", action="version", version=f"mlxserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def models_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--models-dir",
            type=Path,
            help="models root in LM Studio's layout <publisher>/<model>/ "
            "(default: $MLXSERVE_MODELS_DIR or $MLXSERVE_HOME/models, ~/.mlxserve/models)",
        )

    serve = sub.add_parser("serve", help="run the server in the foreground")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 1234)")
    models_dir_option(serve)
    serve.add_argument(
        "--context-length",
        dest="default_context_length",
        type=int,
        help="context length models are loaded with (default 4096, capped by the model)",
    )
    serve.add_argument(
        "--max-output-tokens",
        type=int,
        help="cap every reply at this many generated tokens, whatever the request asks",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    dist = serve.add_argument_group(
        "distributed (one MLX model sharded across several Macs with mx.distributed)"
    )
    dist.add_argument(
        "--distributed",
        nargs="?",
        const="",
        metavar="HOSTFILE",
        help="serve across the hosts of an mlx.launch hostfile (ring backend; this host is "
        "rank 0 and starts the others over ssh), or, without HOSTFILE, join the group "
        "mlx.launch set up",
    )
    dist.add_argument(
        "--distributed-backend",
        dest="distributed_backend",
        choices=["ring", "jaccl", "mpi", "any"],
        help="mx.distributed backend (default ring)",
    )
    dist.add_argument(
        "--distributed-timeout",
        dest="distributed_timeout",
        type=float,
        metavar="SECONDS",
        help="a step that takes longer marks the group failed (default 30)",
    )
    dist.add_argument(
        "--distributed-port",
        dest="distributed_port",
        type=int,
        metavar="PORT",
        help="first port the ring listens on, one more per host (default 32323)",
    )
    lifecycle = serve.add_argument_group("model lifecycle")
    lifecycle.add_argument(
        "--no-jit",
        dest="jit_loading",
        action="store_const",
        const=False,
        help="inference requests use only loaded models (load them with POST "
        "/api/v1/models/load); /v1/models then lists loaded models only",
    )
    lifecycle.add_argument(
        "--ttl",
        dest="ttl_seconds",
        type=float,
        metavar="SECONDS",
        help="unload a just-in-time loaded model after this many idle seconds "
        "(default 3600; 0: never)",
    )
    lifecycle.add_argument(
        "--no-auto-evict",
        dest="auto_evict",
        action="store_const",
        const=False,
        help="keep earlier just-in-time loaded models when another one is loaded",
    )
    lifecycle.add_argument(
        "--flash-attention",
        dest="flash_attention",
        action="store_const",
        const=True,
        help="load GGUF models with flash attention unless a load says otherwise: faster "
        "prompts beside a warm prompt cache, less memory, but replies at temperature 0 may "
        "vary with what ran before (env MLXSERVE_FLASH_ATTENTION)",
    )
    lifecycle.add_argument(
        "--no-guardrail",
        dest="load_guardrail",
        action="store_const",
        const=False,
        help="load models even when their estimated memory exceeds what is free",
    )
    lifecycle.add_argument(
        "--guardrail-memory-gb",
        dest="guardrail_memory_gb",
        type=float,
        metavar="GB",
        help="memory budget for loaded models, in place of the machine's free memory",
    )
    security = serve.add_argument_group("security")
    security.add_argument(
        "--require-auth",
        dest="require_auth",
        action="store_const",
        const=True,
        help="every API route requires 'Authorization: Bearer <token>' "
        "(tokens: mlxserve token create)",
    )
    security.add_argument(
        "--cors",
        dest="cors_origins",
        nargs="?",
        const="*",
        metavar="ORIGINS",
        help="let web pages on other origins call the API: comma-separated origins, or none "
        "for any (off by default)",
    )
    security.add_argument(
        "--allowed-hosts",
        dest="allowed_hosts",
        metavar="HOSTS",
        help="comma-separated extra Host names answered while bound to loopback "
        "(e.g. a reverse proxy's name; *.example.com for a domain)",
    )
    security.add_argument(
        "--max-body-bytes",
        dest="max_body_bytes",
        type=int,
        metavar="BYTES",
        help="largest request body accepted (default 16 MiB)",
    )
    mcp = serve.add_argument_group("MCP (tools from MCP servers in /api/v1/chat, /v1/responses)")
    mcp.add_argument(
        "--allow-ephemeral-mcp",
        dest="allow_ephemeral_mcp",
        action="store_const",
        const=True,
        help="requests may name MCP servers by URL (ephemeral_mcp integrations, mcp tools)",
    )
    mcp.add_argument(
        "--allow-mcp-json",
        dest="allow_mcp_json",
        action="store_const",
        const=True,
        help="requests may use the servers in $MLXSERVE_HOME/mcp.json (needs --require-auth)",
    )
    mcp.add_argument(
        "--mcp-allowed-hosts",
        dest="mcp_allowed_hosts",
        metavar="HOSTS",
        help="comma-separated hosts (or host:port) on loopback or private networks that "
        "ephemeral MCP URLs may reach",
    )
    vision = serve.add_argument_group("Images (vision models)")
    vision.add_argument(
        "--image-allowed-hosts",
        dest="image_allowed_hosts",
        metavar="HOSTS",
        help="comma-separated hosts (or host:port) on loopback or private networks that "
        "image URLs may reach",
    )
    vision.add_argument(
        "--image-file-roots",
        dest="image_file_roots",
        metavar="DIRS",
        help="comma-separated folders file:// image URLs may read from (none by default)",
    )
    vision.add_argument(
        "--image-fetch-timeout",
        dest="image_fetch_timeout",
        type=float,
        metavar="SECONDS",
        help="time limit for fetching an image URL (default 10)",
    )
    vision.add_argument(
        "--max-image-bytes",
        dest="max_image_bytes",
        type=int,
        metavar="BYTES",
        help="largest image file fetched (default 20 MiB)",
    )
    vision.add_argument(
        "--max-image-pixels",
        dest="max_image_pixels",
        type=int,
        metavar="PIXELS",
        help="larger images are refused as decompression bombs (default 40000000)",
    )
    vision.add_argument(
        "--max-images-per-request",
        dest="max_images_per_request",
        type=int,
        metavar="N",
        help="images one request may hold (default 8)",
    )
    serve.set_defaults(func=cmd_serve)
    _source_options(serve)
    # Last: every numeric setting without a flag above gets one.
    _setting_flags(serve)

    ls = sub.add_parser("ls", help="list downloaded models")
    models_dir_option(ls)
    _source_options(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)

    tokens.add_parser(sub)
    _add_client_commands(sub, models_dir_option)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mlxserve.cli.http import CliError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "server_start", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "server_start", False):
            from mlxserve.cli import server

            return server.start(args, extra, parser)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        result: int = args.func(args)
        return result
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``mlxserve`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mlxserve import __version__


def _settings(args: argparse.Namespace) -> Any:
    from mlxserve.settings import Settings

    overrides: dict[str, Any] = {}
    names = (
        "host",
        "port",
        "models_dir",
        "default_context_length",
        "log_level",
        "jit_loading",
        "ttl_seconds",
        "auto_evict",
        "load_guardrail",
        "guardrail_memory_gb",
    )
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"


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
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from mlxserve.core.registry import Registry

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    settings = _settings(args)
    models = Registry(settings.models_root).scan()
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
                "path": str(m.path),
            }
            for m in models
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not models:
        print(f"No models in {settings.models_root}.")
        print("Put MLX folders or GGUF files there as <publisher>/<model>/..., LM Studio's layout.")
        return 0
    header = ("MODEL", "FORMAT", "SIZE", "PARAMS", "QUANT", "ARCH", "CONTEXT")
    rows_text = [
        (
            m.key,
            m.format,
            _human_size(m.size_bytes),
            m.params_string,
            m.quantization,
            m.architecture,
            str(m.max_context_length),
        )
        for m in models
    ]
    widths = [max(len(r[i]) for r in [header, *rows_text]) for i in range(len(header))]
    for row in [header, *rows_text]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


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
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
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
    serve.set_defaults(func=cmd_serve)

    ls = sub.add_parser("ls", help="list downloaded models")
    models_dir_option(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

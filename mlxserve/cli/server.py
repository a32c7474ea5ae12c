"""``mlxserve server start|stop|status``: the server as a background process.

``start`` runs ``mlxserve serve`` detached, logging to ``<home>/logs/server.log``, records its
pid, host and port in ``<home>/server.json`` and returns once ``/health`` answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mlxserve.cli.http import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    SERVER_FILE,
    Client,
    CliError,
    base_url,
    home_dir,
    read_server_file,
    server_address,
)

START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 20.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_server(pid: int) -> bool:
    """Whether ``pid`` is still an mlxserve server, not another process that got its number."""
    if not _alive(pid):
        return False
    try:
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return "mlxserve" in out and " serve" in out


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def start(args: argparse.Namespace, extra: list[str], parser: argparse.ArgumentParser) -> int:
    # Options meant for `serve` are checked now, not in a background process.
    parser.parse_args(["serve", *extra])
    home = home_dir()
    host = args.host or os.environ.get("MLXSERVE_HOST") or DEFAULT_HOST
    port = args.port or int(os.environ.get("MLXSERVE_PORT") or DEFAULT_PORT)
    client = Client(base_url(*server_address(argparse.Namespace(host=host, port=port))))
    health = client.is_up()
    if health is not None:
        print(f"A server is already running at {client.url} (version {health.get('version')}).")
        return 0
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "server.log"
    command = [sys.executable, "-m", "mlxserve", "serve", "--host", host, "--port", str(port)]
    with log_path.open("ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [*command, *extra],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    record = {"pid": proc.pid, "host": host, "port": port, "log": str(log_path)}
    (home / SERVER_FILE).write_text(json.dumps(record), encoding="utf-8")
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    with _spinner(f"Starting the server on {client.url}"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                (home / SERVER_FILE).unlink(missing_ok=True)
                tail = _log_tail(log_path)
                raise CliError(f"The server exited (status {proc.returncode}). Its log:\n{tail}")
            if client.is_up() is not None:
                break
            time.sleep(0.2)
        else:
            raise CliError(
                f"The server did not answer within {START_TIMEOUT_SECONDS:.0f}s; see {log_path}."
            )
    if args.json:
        print(json.dumps({"status": "running", "url": client.url, **record}))
    else:
        print(f"Server started at {client.url} (pid {proc.pid}).")
        print(f"Log: {log_path}")
        print("Stop it with `mlxserve server stop`.")
    return 0


def stop(args: argparse.Namespace) -> int:
    home = home_dir()
    record = read_server_file(home)
    client = Client.from_args(args)
    if record is None or not isinstance(record.get("pid"), int) or not _is_server(record["pid"]):
        (home / SERVER_FILE).unlink(missing_ok=True)
        if client.is_up() is not None:
            raise CliError(
                f"A server runs at {client.url}, but `mlxserve server start` did not start it; "
                "stop it where it runs."
            )
        print("No server is running.")
        return 1
    pid = int(record["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    with _spinner("Stopping the server"):
        while time.monotonic() < deadline and _alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    (home / SERVER_FILE).unlink(missing_ok=True)
    print(f"Server stopped (pid {pid}).")
    return 0


def status(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    health = client.is_up()
    record = read_server_file(home_dir()) or {}
    if health is None:
        if args.json:
            print(json.dumps({"status": "stopped", "url": client.url}))
        else:
            print(f"The server is not running (looked at {client.url}).")
        return 1
    loaded: list[dict[str, Any]] = health.get("loaded") or []
    if args.json:
        details = {**record, **health, "health": health.get("status")}
        print(json.dumps({**details, "status": "running", "url": client.url}))
        return 0
    pid = f", pid {record['pid']}" if record.get("pid") else ""
    print(f"The server is running at {client.url} (version {health.get('version')}{pid}).")
    if health.get("status") != "ok":
        failure = (health.get("distributed") or {}).get("error") or "see its log"
        print(f"It reports a failure: {failure}")
    if "loaded" not in health:
        print("It requires an API token to say which models are loaded (--api-token).")
    elif loaded:
        print(f"{len(loaded)} loaded: " + ", ".join(str(m.get("id")) for m in loaded))
    else:
        print("No models are loaded.")
    return 0


@contextlib.contextmanager
def _spinner(text: str) -> Any:
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(text):
        yield

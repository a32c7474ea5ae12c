"""How the command line reaches a running server: where it is, its token, and errors that
read as sentences instead of tracebacks."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Imported where a command talks to a server: ``serve`` needs this module's errors only, and
# httpx brings its own command line's modules (rich, click, pygments: ≈10 MB resident).
if TYPE_CHECKING:
    import httpx

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1234
SERVER_FILE = "server.json"


class CliError(Exception):
    """A failure to report in one line on stderr, with an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ServerRefused(CliError):
    """The server answered, with an error: the connection itself is fine."""


def home_dir() -> Path:
    from mlxserve.settings import Settings

    return Settings().home


def read_server_file(home: Path) -> dict[str, Any] | None:
    """What ``mlxserve server start`` recorded about the server it started, if anything."""
    try:
        data = json.loads((home / SERVER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _connect_host(host: str) -> str:
    # A server bound to every address is reached on loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def server_address(args: argparse.Namespace) -> tuple[str, int]:
    """The server to talk to: ``--host``/``--port``, else ``MLXSERVE_HOST``/``MLXSERVE_PORT``,
    else the one ``server start`` started, else 127.0.0.1:1234."""
    recorded = read_server_file(home_dir()) or {}
    host = getattr(args, "host", None) or os.environ.get("MLXSERVE_HOST")
    port = getattr(args, "port", None) or os.environ.get("MLXSERVE_PORT")
    host = host or recorded.get("host") or DEFAULT_HOST
    port = port or recorded.get("port") or DEFAULT_PORT
    try:
        port_number = int(port)
    except ValueError:
        raise CliError(f"The port must be a number, not {port!r}.", 2) from None
    return _connect_host(str(host)), port_number


def base_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@dataclass
class Client:
    """The server's HTTP API as the CLI uses it."""

    url: str
    token: str | None = None
    timeout: float = 30.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Client:
        token = getattr(args, "api_token", None) or os.environ.get("MLXSERVE_API_TOKEN")
        return cls(base_url(*server_address(args)), token or None)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _fail(self, response: httpx.Response) -> ServerRefused:
        message = f"The server answered HTTP {response.status_code}."
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
        elif isinstance(error, str):
            message = error
        if response.status_code == 401:
            message += (
                " The server requires an API token: pass --api-token or set MLXSERVE_API_TOKEN "
                "(create one with `mlxserve token create`)."
            )
        return ServerRefused(message)

    def not_running(self) -> CliError:
        return CliError(
            f"No mlxserve server is running at {self.url}. Start one with "
            "`mlxserve server start` (or pass --host/--port)."
        )

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        import httpx

        try:
            response = httpx.request(
                method,
                self.url + path,
                json=body,
                headers=self._headers(),
                timeout=timeout if timeout is not None else self.timeout,
            )
        except httpx.ConnectError:
            raise self.not_running() from None
        except httpx.TimeoutException:
            raise CliError(f"The server at {self.url} did not answer in time.") from None
        except httpx.HTTPError as exc:
            raise CliError(f"Talking to the server at {self.url} failed: {exc}") from None
        if response.status_code >= 400:
            raise self._fail(response)
        try:
            return response.json()
        except ValueError:
            raise CliError(f"The server at {self.url} sent a reply that is not JSON.") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        return self.request("POST", path, body, timeout)

    def is_up(self) -> dict[str, Any] | None:
        """``/health`` when a server answers there, else None."""
        import httpx

        try:
            response = httpx.get(self.url + "/health", headers=self._headers(), timeout=2)
        except httpx.HTTPError:
            return None
        # 503 is a server that answers but reports a failure (a distributed group lost a rank).
        if response.status_code not in (200, 503):
            return None
        try:
            data = response.json()
        except ValueError:
            return None
        return data if isinstance(data, dict) and "status" in data else None

    def stream_events(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """The JSON events of a server-sent event stream (comments and ``[DONE]`` skipped)."""
        import httpx

        try:
            with httpx.stream(
                method,
                self.url + path,
                json=body,
                headers=self._headers(),
                timeout=httpx.Timeout(self.timeout, read=None),
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._fail(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        yield event
        except httpx.ConnectError:
            raise self.not_running() from None
        except (httpx.RemoteProtocolError, httpx.ReadError):
            raise CliError(f"The server at {self.url} closed the connection.") from None
        except httpx.TimeoutException:
            raise CliError(f"The server at {self.url} did not answer in time.") from None
        except httpx.HTTPError as exc:
            raise CliError(f"Talking to the server at {self.url} failed: {exc}") from None


def client_options(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """The options of every command that talks to a running server."""
    group = p.add_argument_group("server connection")
    group.add_argument("--host", help="server address (default: $MLXSERVE_HOST or 127.0.0.1)")
    group.add_argument("--port", type=int, help="server port (default: $MLXSERVE_PORT or 1234)")
    group.add_argument(
        "--api-token", help="API token, when the server requires one (default: $MLXSERVE_API_TOKEN)"
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def human_size(n: int | float) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"

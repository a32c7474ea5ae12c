"""A Hugging Face hub look-alike on loopback, for download tests (``HF_ENDPOINT``).

It serves the endpoints ``huggingface_hub`` calls: ``GET /api/models`` (the model search:
``search``, ``filter`` by library tag, ``sort=downloads``, ``limit``), ``GET
/api/models/{repo}[/revision/{rev}]`` (siblings with sizes, git blob ids and LFS sha256) and ``HEAD``/``GET
/{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and
``Range`` support. Faults for tests: ``corrupt`` serves other bytes than the metadata lists,
``throttle`` slows transfers, ``drop_after`` cuts a transfer once after N bytes.

Run it by hand for a demo: ``python tests/hubserver.py --port 8765 publisher/model=/path/dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

_LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class HubFile:
    path: Path
    size: int
    sha256: str
    blob_id: str
    lfs: bool


@dataclass
class HubRepo:
    commit: str
    files: dict[str, HubFile]
    downloads: int = 0

    @property
    def tags(self) -> list[str]:
        return ["gguf"] if any(n.endswith(".gguf") for n in self.files) else ["mlx"]


@dataclass
class Hub:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    # File names whose served bytes differ from the listed checksum.
    corrupt: set[str] = field(default_factory=set)
    # Seconds to sleep after each 64 KiB chunk.
    throttle: float = 0.0
    # File name -> bytes after which the next transfer of it is cut (once).
    drop_after: dict[str, int] = field(default_factory=dict)
    # (method, path, Range header) of every request.
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(
        self, repo_id: str, folder: Path, names: list[str] | None = None, downloads: int = 0
    ) -> HubRepo:
        files: dict[str, HubFile] = {}
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith(".") or (names and p.name not in names):
                continue
            data_sha = hashlib.sha256()
            blob = hashlib.sha1(f"blob {p.stat().st_size}\0".encode())
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    data_sha.update(chunk)
                    blob.update(chunk)
            files[p.name] = HubFile(
                p,
                p.stat().st_size,
                data_sha.hexdigest(),
                blob.hexdigest(),
                p.name.endswith(_LFS_SUFFIXES),
            )
        commit = hashlib.sha1(
            repo_id.encode() + b"".join(f.sha256.encode() for f in files.values())
        )
        repo = HubRepo(commit.hexdigest(), files, downloads)
        self.repos[repo_id] = repo
        return repo

    def model_info(self, repo_id: str) -> dict:
        repo = self.repos[repo_id]
        siblings = []
        for name, f in repo.files.items():
            sibling: dict = {"rfilename": name, "size": f.size, "blobId": f.blob_id}
            if f.lfs:
                sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(sibling)
        return {
            "_id": repo.commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.commit,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": repo.downloads,
            "likes": 0,
            "library_name": repo.tags[0],
            "tags": repo.tags,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": siblings,
        }


def search(hub: Hub, query: dict[str, list[str]]) -> list[dict]:
    """The hub's model search, as much of it as ``HfApi.list_models`` uses here."""
    text = query.get("search", [""])[0].lower()
    wanted = set(query.get("filter", []))
    found = [
        (repo_id, repo)
        for repo_id, repo in hub.repos.items()
        if text in repo_id.lower() and wanted <= set(repo.tags)
    ]
    if query.get("sort", [""])[0] == "downloads":
        found.sort(key=lambda r: -r[1].downloads)
    limit = int(query.get("limit", ["1000"])[0])
    return [hub.model_info(repo_id) for repo_id, _ in found[:limit]]


_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _json(
            self, status: int, body: dict | list, headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _not_found(self) -> None:
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

        def _route(self) -> None:
            path = unquote(urlparse(self.path).path)
            with hub.lock:
                hub.requests.append((self.command, path, self.headers.get("Range")))
            if path == "/api/models" and self.command == "GET":
                return self._json(200, search(hub, parse_qs(urlparse(self.path).query)))
            m = _INFO.match(path)
            if m and self.command == "GET":
                if m.group(1) not in hub.repos:
                    return self._not_found()
                return self._json(200, hub.model_info(m.group(1)))
            m = _RESOLVE.match(path)
            if not m or m.group(1) not in hub.repos:
                return self._not_found()
            repo = hub.repos[m.group(1)]
            if m.group(2) not in ("main", repo.commit):
                return self._json(
                    404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}
                )
            f = repo.files.get(m.group(3))
            if f is None:
                return self._json(
                    404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
                )
            self._send_file(repo, m.group(3), f)

        def _send_file(self, repo: HubRepo, name: str, f: HubFile) -> None:
            start = 0
            rng = self.headers.get("Range")
            if rng:
                m = re.match(r"bytes=(\d+)-$", rng.strip())
                if m:
                    start = int(m.group(1))
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(f.size - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{f.sha256 if f.lfs else f.blob_id}"')
            self.send_header("X-Repo-Commit", repo.commit)
            if f.lfs:
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(f.size))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if self.command == "HEAD":
                return
            with hub.lock:
                drop = hub.drop_after.pop(name, None)
            sent = start
            with f.path.open("rb") as src:
                src.seek(start)
                while chunk := src.read(1 << 16):
                    if name in hub.corrupt:
                        chunk = bytes(b ^ 0xFF for b in chunk[:16]) + chunk[16:]
                    if drop is not None and sent + len(chunk) > drop:
                        self.wfile.write(chunk[: max(drop - sent, 0)])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if hub.throttle:
                        time.sleep(hub.throttle)

        def do_GET(self) -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._route()

        do_HEAD = do_GET

    return Handler


class HubServer:
    """The hub running in a thread: ``url`` is what ``HF_ENDPOINT`` should be."""

    def __init__(self, hub: Hub, port: int = 0) -> None:
        self.hub = hub
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(hub))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--throttle", type=float, default=0.0, help="seconds per 64 KiB chunk")
    parser.add_argument("repos", nargs="+", metavar="PUBLISHER/MODEL=FOLDER")
    args = parser.parse_args()
    hub = Hub(throttle=args.throttle)
    for spec in args.repos:
        repo_id, _, folder = spec.partition("=")
        hub.add_repo(repo_id, Path(folder))
    server = HubServer(hub, args.port)
    print(f"hub at {server.url} (HF_ENDPOINT={server.url})", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()

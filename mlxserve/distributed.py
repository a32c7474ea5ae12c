"""``mlxserve serve --distributed``: join an ``mx.distributed`` group, or start one.

``--distributed HOSTFILE`` (ring backend) makes this process rank 0 and starts every other
rank itself (locally for a loopback host, over ``ssh`` otherwise), so that a rank that dies
is reported by rank 0 instead of taking it down (``mlx.launch`` stops every rank when one
exits). Plain ``--distributed`` joins the group a launcher described in the environment
(``mlx.launch``, any backend).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlxserve.settings import Settings

log = logging.getLogger("mlxserve.distributed")

_LOCAL = {"127.0.0.1", "localhost", "::1"}


class HostfileError(ValueError):
    """The hostfile cannot describe a ring."""


@dataclass(frozen=True)
class Host:
    ssh: str
    ip: str

    @property
    def local(self) -> bool:
        return self.ssh in _LOCAL or self.ssh == socket.gethostname()


def read_hostfile(path: Path) -> tuple[list[Host], str]:
    """The hosts (and backend, if named) of an ``mlx.launch`` hostfile: a JSON list of
    ``{"ssh": name, "ips": [address, ...]}``, or ``{"backend": ..., "hosts": [...]}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HostfileError(f"cannot read the hostfile {path}: {exc}") from exc
    backend = ""
    if isinstance(data, dict):
        backend = str(data.get("backend") or "")
        data = data.get("hosts")
    if not isinstance(data, list) or len(data) < 2:
        raise HostfileError(f"the hostfile {path} must list at least two hosts")
    hosts = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str):
            raise HostfileError(f"host {i} in {path} needs an 'ssh' name")
        ips = entry.get("ips") or []
        ip = ips[0] if ips else entry["ssh"]
        try:
            ipaddress.ip_address(ip)
        except ValueError as exc:
            raise HostfileError(
                f"host {i} ({entry['ssh']}) needs an IP address in 'ips' for the ring backend"
            ) from exc
        hosts.append(Host(entry["ssh"], ip))
    return hosts, backend


def _worker_command(rank: int, ring: str, settings: Settings) -> list[str]:
    env = {
        "MLX_RANK": str(rank),
        "MLXSERVE_DISTRIBUTED_BACKEND": "ring",
        "MLXSERVE_DISTRIBUTED_TIMEOUT": str(settings.distributed_timeout),
        "MLXSERVE_LOG_LEVEL": settings.log_level,
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    command = shlex.join([sys.executable, "-m", "mlxserve", "serve", "--distributed"])
    # The ring description travels in a file, as mlx.launch does it.
    return [
        "bash",
        "-c",
        f"f=$(mktemp); printf %s {shlex.quote(ring)} >$f; "
        f"export MLX_HOSTFILE=$f {exports}; exec {command}",
    ]


def launch(hostfile: Path, settings: Settings) -> list[subprocess.Popen[bytes]]:
    """Start ranks 1.. of the ring ``hostfile`` describes, and set this process up as rank 0."""
    hosts, backend = read_hostfile(hostfile)
    if backend and backend != "ring":
        raise HostfileError(
            f"the hostfile names the {backend} backend: start it with mlx.launch "
            f"(mlx.launch --hostfile {hostfile} -- mlxserve serve --distributed "
            f"--distributed-backend {backend})"
        )
    if settings.distributed_backend not in ("ring", "any"):
        raise HostfileError(
            f"--distributed HOSTFILE starts a ring; for {settings.distributed_backend} use "
            f"mlx.launch --backend {settings.distributed_backend} --hostfile {hostfile} -- "
            "mlxserve serve --distributed"
        )
    port = settings.distributed_port
    ring = json.dumps([[f"{h.ip}:{port + i}"] for i, h in enumerate(hosts)])
    with tempfile.NamedTemporaryFile(
        "w", prefix="mlxserve-ring-", suffix=".json", delete=False
    ) as handle:
        handle.write(ring)
    os.environ["MLX_HOSTFILE"] = handle.name
    os.environ["MLX_RANK"] = "0"
    workers = []
    for rank, host in enumerate(hosts[1:], start=1):
        command = _worker_command(rank, ring, settings)
        if not host.local:
            command = ["ssh", host.ssh, shlex.join(command)]
        log.info("starting rank %d on %s", rank, host.ssh)
        workers.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
    return workers


def stop_workers(workers: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    for proc in workers:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

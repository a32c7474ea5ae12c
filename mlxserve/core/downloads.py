"""Model downloads from a Hugging Face hub into the models directory, in LM Studio's layout.

A transfer stages files under ``<models>/.downloads/`` (hidden from listings), each written
to ``<file>.incomplete`` and resumed with a ``Range`` request after an interruption, even by
a new process. Every file is verified against the hub's metadata (sha256 for LFS files, the
git blob id for the others; ``huggingface_hub`` itself checks only sizes) before the model
is moved into place with one rename, so a model appears only when it is complete.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from mlxserve.core.hubfiles import (
    _HUB_HOSTS,
    DownloadError,
    DownloadSpec,
    RemoteFile,
    _matches_quant,
    _safe_name,
    parse_spec,
    select_files,
    verify,
)
from mlxserve.core.registry import Registry
from mlxserve.errors import MlxServeError

log = logging.getLogger("mlxserve.downloads")

STAGING_DIR = ".downloads"
_KEEP_JOBS = 200

Status = Literal["downloading", "completed", "failed"]


class HubModelNotFound(DownloadError):
    status = 404
    code = "model_not_found"


class HubUnreachable(DownloadError):
    status = 502
    kind = "server_error"
    code = "hub_unreachable"


class InsufficientDiskSpace(DownloadError):
    status = 507
    kind = "server_error"
    code = "insufficient_disk_space"


class ChecksumMismatch(DownloadError):
    code = "checksum_mismatch"


class JobNotFound(MlxServeError):
    status = 404
    kind = "invalid_request_error"
    code = "download_not_found"


class _Cancelled(Exception):
    pass


def _now_iso(ts: float) -> str:
    return (
        dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"
    )


@dataclass
class DownloadJob:
    """One transfer; ``status()`` is LM Studio's download status object."""

    id: str
    spec: DownloadSpec
    revision: str
    files: list[RemoteFile]
    staging: Path
    dest: Path
    started_at: float = field(default_factory=time.time)
    state: Status = "downloading"
    completed_at: float | None = None
    error: str | None = None
    model_key: str | None = None  # the registry key that loads what was downloaded
    done_bytes: int = 0  # files finished
    file_bytes: int = 0  # the file in flight, including what a resume started from
    cancel: threading.Event = field(default_factory=threading.Event)
    cancelled_by_request: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    _samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=20))

    @property
    def total_size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def downloaded_bytes(self) -> int:
        if self.state == "completed":
            return self.total_size_bytes
        return min(self.done_bytes + self.file_bytes, self.total_size_bytes)

    def sample(self) -> None:
        now = time.monotonic()
        self._samples.append((now, self.downloaded_bytes))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.popleft()

    def bytes_per_second(self) -> float:
        self.sample()
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 - t0 > 0.2 else 0.0

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job_id": self.id,
            "status": self.state,
            "model": self.spec.repo,
            "quantization": self.spec.quantization,
            "total_size_bytes": self.total_size_bytes,
            "downloaded_bytes": self.downloaded_bytes,
            "started_at": _now_iso(self.started_at),
        }
        if self.state == "downloading":
            speed = self.bytes_per_second()
            out["bytes_per_second"] = round(speed)
            left = self.total_size_bytes - self.downloaded_bytes
            if speed > 0:
                out["estimated_completion"] = _now_iso(time.time() + left / speed)
        if self.completed_at is not None:
            out["completed_at"] = _now_iso(self.completed_at)
        if self.model_key is not None:
            out["model_key"] = self.model_key
        if self.error is not None:
            out["error"] = self.error
        return out


class _Progress:
    """The progress object ``huggingface_hub.file_download.http_get`` updates per chunk:
    counts bytes for the job and stops the transfer when the job is cancelled."""

    def __init__(self, job: DownloadJob, initial: int = 0, **_: Any) -> None:
        self.job = job
        job.file_bytes = initial

    def update(self, n: int = 1) -> None:
        if self.job.cancel.is_set():
            raise _Cancelled
        self.job.file_bytes += n

    def close(self) -> None:
        pass

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class DownloadManager:
    """Download jobs of one server; the same model asked for twice shares one job."""

    def __init__(self, root: Path, registry: Registry, endpoint: str | None = None) -> None:
        self.root = root
        self.registry = registry
        self.endpoint = endpoint
        self.jobs: dict[str, DownloadJob] = {}
        self._active: dict[tuple[str, str], DownloadJob] = {}
        self._starting: dict[tuple[str, str], asyncio.Future[DownloadJob | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- starting -------------------------------------------------------------------------

    def parse(self, model: str, quantization: str | None = None) -> DownloadSpec:
        hosts = _HUB_HOSTS
        endpoint = self.endpoint or os.environ.get("HF_ENDPOINT")
        if endpoint and urlparse(endpoint).hostname:
            hosts = hosts | {str(urlparse(endpoint).hostname)}
        return parse_spec(model, quantization, hosts)

    def already_downloaded(self, spec: DownloadSpec) -> bool:
        folder = self.root / spec.publisher / spec.name
        if not folder.is_dir():
            return False
        if spec.quantization:
            return any(
                _matches_quant(p.name, spec.quantization)
                for p in folder.glob("*.gguf")
                if not p.name.startswith("mmproj")
            )
        return self.registry.get(spec.repo) is not None

    async def start(self, spec: DownloadSpec) -> DownloadJob | None:
        """The job downloading ``spec`` (an existing one if it runs already), or None when the
        model is downloaded already."""
        key = (spec.repo.lower(), (spec.quantization or "").lower())
        active = self._active.get(key)
        if active is not None:
            return active
        starting = self._starting.get(key)
        if starting is not None:
            return await asyncio.shield(starting)
        future: asyncio.Future[DownloadJob | None] = asyncio.get_running_loop().create_future()
        self._starting[key] = future
        try:
            job = await self._create(spec)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, none is required
            raise
        else:
            future.set_result(job)
        finally:
            del self._starting[key]
        if job is not None:
            self._active[key] = job
            task = asyncio.create_task(self._run(key, job), name=f"download-{job.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return job

    async def _create(self, spec: DownloadSpec) -> DownloadJob | None:
        if self.already_downloaded(spec):
            return None
        revision, remote = await asyncio.to_thread(self.model_files, spec)
        files, fmt = select_files(spec, remote)
        dest = self.root / spec.publisher / spec.name
        if fmt == "mlx" and dest.exists():
            raise DownloadError(
                f"{spec.repo} exists in the models directory but is not a usable model; remove "
                f"it first (mlxserve rm {spec.repo})."
            )
        label = f"{spec.publisher}__{spec.name}" + (
            f"@{spec.quantization}" if fmt == "gguf" else ""
        )
        staging = self.root / STAGING_DIR / label.lower()
        job = DownloadJob(
            id=f"job_{secrets.token_hex(5)}",
            spec=spec,
            revision=revision,
            files=files,
            staging=staging,
            dest=dest,
        )
        self._check_disk_space(job)
        self.jobs[job.id] = job
        while len(self.jobs) > _KEEP_JOBS:
            del self.jobs[next(iter(self.jobs))]
        log.info("downloading %s (%d files, %d bytes)", spec.repo, len(files), job.total_size_bytes)
        return job

    def model_files(self, spec: DownloadSpec) -> tuple[str, list[RemoteFile]]:
        """The revision and files (with sizes and checksums) of a hub repository."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            info = HfApi(endpoint=self.endpoint).model_info(spec.repo, files_metadata=True)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise HubModelNotFound(f"{spec.repo} was not found on the model hub.") from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403, 404):
                raise HubModelNotFound(
                    f"{spec.repo} was not found on the model hub (or needs a login)."
                ) from None
            raise HubUnreachable(f"The model hub answered {status} for {spec.repo}.") from None
        except MlxServeError:
            raise
        except Exception as exc:  # noqa: BLE001 - OSError, httpx, requests: hub clients differ
            raise HubUnreachable(f"Cannot reach the model hub: {exc}") from None
        files = []
        for s in info.siblings or []:
            if not _safe_name(s.rfilename):
                continue
            lfs = s.lfs
            size = lfs.size if lfs is not None else s.size
            if size is None:
                raise HubUnreachable(f"The model hub sent no size for {s.rfilename}.")
            files.append(RemoteFile(s.rfilename, int(size), lfs.sha256 if lfs else None, s.blob_id))
        return str(info.sha or "main"), files

    def _check_disk_space(self, job: DownloadJob) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        have = 0
        for f in job.files:
            for p in (job.staging / f.local_name, job.staging / f"{f.local_name}.incomplete"):
                if p.is_file():
                    have += p.stat().st_size
        needed = job.total_size_bytes - have
        free = shutil.disk_usage(self.root).free
        if needed > free:
            raise InsufficientDiskSpace(
                f"Not enough disk space for {job.spec.repo}: it needs {needed / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB is free in the models directory."
            )

    # --- running --------------------------------------------------------------------------

    async def _run(self, key: tuple[str, str], job: DownloadJob) -> None:
        try:
            await asyncio.to_thread(self._transfer, job)
        except _Cancelled:
            why = "cancelled" if job.cancelled_by_request else "cancelled (the server stopped)"
            job.state, job.error = "failed", f"{why}; ask again to resume"
        except MlxServeError as exc:
            job.state, job.error = "failed", exc.message
        except Exception as exc:
            log.exception("download of %s failed", job.spec.repo)
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            job.state, job.completed_at = "completed", time.time()
            job.model_key = await asyncio.to_thread(self._key_of, job)
            log.info("downloaded %s", job.spec.repo)
        finally:
            if job.error:
                log.warning("download of %s failed: %s", job.spec.repo, job.error)
            self._active.pop(key, None)
            job.finished.set()

    def _transfer(self, job: DownloadJob) -> None:
        job.staging.mkdir(parents=True, exist_ok=True)
        for remote in job.files:
            if job.cancel.is_set():
                raise _Cancelled
            self._fetch(job, remote)
            job.done_bytes += remote.size
            job.file_bytes = 0
        try:
            self._promote(job)
        finally:
            self.registry.invalidate()

    def _fetch(self, job: DownloadJob, remote: RemoteFile) -> None:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        final = job.staging / remote.local_name
        if final.is_file():
            # Staged by an earlier, interrupted job: verified again, never trusted.
            if verify(final, remote) is None:
                return
            final.unlink()
        partial = job.staging / f"{remote.local_name}.incomplete"
        url = hf_hub_url(job.spec.repo, remote.name, revision=job.revision, endpoint=self.endpoint)
        with partial.open("ab") as f:
            resume = f.tell()
            if resume > remote.size:
                f.truncate(0)
                resume = 0
            if resume:
                log.info("resuming %s at byte %d", remote.name, resume)

            def progress(**kw: Any) -> _Progress:
                return _Progress(job, **kw)

            try:
                http_get(
                    url,
                    f,
                    resume_size=resume,
                    headers=build_hf_headers(),
                    expected_size=remote.size,
                    displayed_filename=remote.name,
                    tqdm_class=progress,  # type: ignore[arg-type]
                )
            except (_Cancelled, MlxServeError):
                raise
            except OSError as exc:
                raise HubUnreachable(f"Downloading {remote.name} failed: {exc}") from None
            except Exception as exc:  # huggingface_hub's HTTP errors
                raise HubUnreachable(f"Downloading {remote.name} failed: {exc}") from None
        problem = verify(partial, remote)
        if problem is not None:
            partial.unlink()
            raise ChecksumMismatch(f"Verification failed, the file was deleted: {problem}")
        os.replace(partial, final)

    def _key_of(self, job: DownloadJob) -> str | None:
        """The key of what ``job`` placed: a quantization's own key when its folder holds
        several (the folder's key serves whichever file sorts first)."""
        names = {f.local_name for f in job.files}
        keys = [
            info.key
            for info in self.registry.scan()
            if info.path == job.dest and (info.format == "mlx" or info.weights.name in names)
        ]
        return max(keys, key=lambda k: "@" in k, default=None)

    def _promote(self, job: DownloadJob) -> None:
        """Move the verified files into the models directory: the folder in one rename, or
        for another quantization of a GGUF model already there, file by file with the first
        shard last (the registry only sees a split model once its first shard is there)."""
        job.dest.parent.mkdir(parents=True, exist_ok=True)
        leftovers = [p for p in job.staging.iterdir() if p.name.endswith(".incomplete")]
        for p in leftovers:
            p.unlink()
        if not job.dest.exists():
            os.rename(job.staging, job.dest)
        else:
            names = sorted((f.local_name for f in job.files), key=lambda n: "-00001-of-" in n)
            for name in names:
                os.replace(job.staging / name, job.dest / name)
            shutil.rmtree(job.staging, ignore_errors=True)
        with_staging = job.staging.parent
        if with_staging.is_dir() and not any(with_staging.iterdir()):
            with_staging.rmdir()

    # --- queries and shutdown -------------------------------------------------------------

    def get(self, job_id: str) -> DownloadJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFound("No download job with this id.", param="job_id")
        return job

    async def cancel(self, job_id: str) -> DownloadJob:
        """Stop a transfer; what it staged stays, so asking for the model again resumes it."""
        job = self.get(job_id)
        if job.state == "downloading":
            job.cancelled_by_request = True
            job.cancel.set()
            await job.finished.wait()
        return job

    async def close(self) -> None:
        """Stop the transfers; what they staged stays, and the next request resumes it."""
        for job in self._active.values():
            job.cancel.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

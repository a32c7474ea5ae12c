"""LM Studio's download API: start a download, then poll its job."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve.protocols.downloads import DownloadRequest
from mlxserve.routes.common import parse, read_json
from mlxserve.state import AppState


async def download(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(DownloadRequest, await read_json(request))
    spec = state.downloads.parse(body.model, body.quantization)
    job = await state.downloads.start(spec)
    if job is None:
        return JSONResponse({"status": "already_downloaded"})
    status = job.status()
    return JSONResponse(
        {
            "job_id": job.id,
            "status": status["status"],
            "total_size_bytes": status["total_size_bytes"],
            "started_at": status["started_at"],
        }
    )


async def download_status(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    job = state.downloads.get(request.path_params["job_id"])
    return JSONResponse(job.status())


routes = [
    Route("/api/v1/models/download", download, methods=["POST"]),
    Route("/api/v1/models/download/status/{job_id}", download_status, methods=["GET"]),
]

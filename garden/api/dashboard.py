"""The dashboard: one static page (vanilla JS, inline SVG charts) served by the local HTTP port.

``GET /`` answers the page; ``GET /dashboard/{name}`` its script and style sheet, and nothing else
(a whitelist, so no path ever reaches the file system). The files ship inside the package
(``garden/api/dashboard/``): the page needs no CDN and no build step, and reads the same JSON
endpoints as any other client (``/status``, ``/peers``, ``/missions``, ``/models``).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

ASSETS: dict[str, str] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
NO_CACHE = {"Cache-Control": "no-cache"}


def _read(name: str) -> bytes:
    return (files("garden.api") / "dashboard" / name).read_bytes()


def make_dashboard_router() -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=NO_CACHE)

    @router.get("/dashboard/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(status_code=404, detail=f"no dashboard file {name!r}")
        return Response(_read(name), media_type=media_type, headers=NO_CACHE)

    return router

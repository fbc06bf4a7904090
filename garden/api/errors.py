"""The one place where domain errors (``garden.errors``) become HTTP status codes."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from garden.errors import Conflict, GardenError, NotAllowed, NotFound, PeerFailed, Refused, Unavailable

STATUS: dict[type[GardenError], int] = {
    NotFound: 404,
    Conflict: 409,
    NotAllowed: 403,
    Refused: 400,
    Unavailable: 503,
    PeerFailed: 502,
}


def status_of(error: GardenError) -> int:
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 400


def error_response(error: GardenError) -> JSONResponse:
    """The port's error shape, ``{"detail": message}``, with the status that fits the error."""
    return JSONResponse({"detail": str(error)}, status_code=status_of(error))

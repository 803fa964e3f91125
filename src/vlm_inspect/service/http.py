"""What every app of ours shares: API errors as JSON with the right status, the API-key check, the fixed page
files, the loopback Host guard, and binding the address before a model loads."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from vlm_inspect.errors import ConfigError
from vlm_inspect.service.batcher import QueueFull
from vlm_inspect.service.limits import BodyTooLarge, ClientGone, HostCheck, NoSniff, RequestRefused, log_client_gone

STATIC = Path(__file__).parent / "static"


PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
PAGE_FILES |= {"history.html": "text/html", "history.js": "text/javascript"}
PAGE_FILES |= {"line.html": "text/html", "line.js": "text/javascript", "line.css": "text/css"}


RETRY_AFTER_S = 1


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    410: "not_found_error",
    413: "request_too_large",
    415: "unsupported_media_type",
    421: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "overloaded_error",
    504: "timeout_error",
}


PAGE_HEADERS = {
    # The page loads only its own files and talks only to this server.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ApiError(Exception):
    """An error answered to the client with an HTTP status and a message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def page_file(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)


def key_checker(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing requests without `Authorization: Bearer <api_key>` (when a key is set)."""
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes as long for a near miss as for a wild guess.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY'", {"WWW-Authenticate": "Bearer"}
            )

    return check


def status_of(err: Exception) -> tuple[int, str]:
    """HTTP status and client-safe message for an exception; unexpected ones say nothing inside."""
    if isinstance(err, (ApiError, RequestRefused)):
        return err.status, err.message
    if isinstance(err, (ClientGone, ClientDisconnect)):
        return 499, "the client closed the connection"
    if isinstance(err, QueueFull):
        return 503, f"the server is busy ({err}); retry in {RETRY_AFTER_S} s"
    if isinstance(err, asyncio.TimeoutError):  # the builtin TimeoutError from Python 3.11 on
        return 504, "the model did not answer within the request timeout"
    if isinstance(err, BodyTooLarge):
        return 413, "request body is over the upload limit"
    if isinstance(err, HTTPException):
        return err.status_code, str(err.detail)
    return 500, "internal error while handling the request; the server log has the details"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error")}}
    return JSONResponse(body, status_code=status, headers={**(headers or {}), "X-Content-Type-Options": "nosniff"})


def guard(app: FastAPI, host: str, port: int) -> None:
    """What every app of ours gets: loopback Host names only on a loopback bind (DNS rebinding), `nosniff`
    on every response, and errors as JSON."""
    if is_loopback(host):
        app.add_middleware(HostCheck, port=port, respond=error_response)
    app.add_middleware(NoSniff)
    _add_error_handlers(app)


def _add_error_handlers(app: FastAPI) -> None:
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own checks of path and query parameters: the same shape as every other error.
        return error_response(422, validation_problems(err.errors()))

    async def handle(request: Request, err: Exception) -> JSONResponse:
        status, message = status_of(err)
        if status == 499:  # one log line, not a traceback: nobody is left to read the answer
            log_client_gone(
                request.url.path, "mid-upload" if isinstance(err, ClientDisconnect) else "before its answer"
            )
        headers = dict(err.headers or {}) if isinstance(err, (ApiError, RequestRefused, HTTPException)) else {}
        if status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        return error_response(status, message, headers or None)

    kinds = (ApiError, RequestRefused, ClientGone, ClientDisconnect, QueueFull, asyncio.TimeoutError, BodyTooLarge)
    for kind in (*kinds, HTTPException, Exception):
        app.add_exception_handler(kind, handle)
    app.add_exception_handler(RequestValidationError, invalid)


def bind(host: str, port: int) -> socket.socket:
    """Claim the address before the model loads, so a busy port fails fast and clearly."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise ConfigError([f"host/port: cannot listen on {host}:{port} ({err.strerror or err})"]) from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"body is not valid JSON ({err})") from None


def validate_body(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ApiError(422, validation_problems(err.errors())) from None


def validation_problems(errors: Sequence[Any]) -> str:
    """Pydantic's or FastAPI's validation errors as one message, each naming its field (`query.limit: ...`)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)


def base64_image(text: str, where: str) -> bytes:
    """Bytes of a base64 image, given bare or as a `data:` URI."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: a data: URI must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: not valid base64") from None


def check_size(data: bytes, max_upload: int) -> None:
    if len(data) > max_upload:
        raise ApiError(413, f"image is over the upload limit of {max_upload / 1024 / 1024:g} MB")


def run_server(app: FastAPI, sock: socket.socket, log_level: str) -> None:
    """Serve `app` on the bound socket until interrupted (uvicorn; five seconds to finish on shutdown)."""
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])

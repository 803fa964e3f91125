"""Bounds and guards around every request: time to send the body, prompt length, who may call, who left.

- `BodyDeadline`: the whole body must arrive within `body_timeout_s` (408 otherwise), so a client
  dripping a byte a second cannot hold a connection for minutes.
- `HostCheck`: on a loopback bind only `Host: 127.0.0.1|localhost|[::1][:PORT]` is served (421
  otherwise): a web page that re-points its own name at 127.0.0.1 (DNS rebinding) cannot read answers.
- `NoSniff`: every response says `X-Content-Type-Options: nosniff`.
- `until_client_leaves`: a request's model work is cancelled when its client hangs up, so it is
  dropped from the queue before it reaches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from vlm_inspect.errors import ConfigError

T = TypeVar("T")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
API_KEY_ENV = "VLM_INSPECT_API_KEY"
log = logging.getLogger("uvicorn.error")


class RequestRefused(Exception):
    """A request stopped by a limit: answered with `status` and `message` (and `headers`)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class ClientGone(Exception):
    """The client hung up before its answer was ready; its model work was cancelled."""


# ---------------------------------------------------------------- ASGI middlewares


class BodyDeadline:
    """Refuse (408) a request whose body is still arriving `timeout_s` after the request began."""

    def __init__(self, app: Any, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def timed_receive() -> dict:
            nonlocal body_done
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                raise RequestRefused(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s (body_timeout_s)",
                    {"Connection": "close"},
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


class HostCheck:
    """On a loopback bind, answer 421 to a Host header other than the loopback names (with the port)."""

    def __init__(self, app: Any, port: int, respond: Callable[[int, str], Any]):
        self.app, self.respond = app, respond
        self.allowed = {name.encode() for name in LOOPBACK_NAMES}
        self.allowed |= {f"{name}:{port}".encode() for name in LOOPBACK_NAMES}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host", b"").lower()
            if host not in self.allowed:
                shown = host.decode("latin-1")[:100] or "(none)"
                message = (
                    f"Host {shown!r} is not served: this server listens on loopback and answers only "
                    "127.0.0.1, localhost or [::1] (a guard against DNS rebinding)"
                )
                await self.respond(421, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class NoSniff:
    """`X-Content-Type-Options: nosniff` on every response."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-content-type-options"]
                message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, send_with_header)


# ---------------------------------------------------------------- requests


async def until_client_leaves(request: Any, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then raise ClientGone).

    A cancelled wait cancels the batcher's future, and the model worker skips work whose future is
    done: an abandoned request never reaches the model unless it was already running.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done() and not watcher.done():  # this request itself was cancelled
            task.cancel()
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone()


async def _disconnect(request: Any) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def check_prompt_length(messages: Iterable[Any], max_chars: int) -> None:
    """Raise 413 when the text of a chat conversation is longer than `max_chars` characters."""
    total = 0
    for message in messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content:
            total += sum(len(getattr(part, "text", "")) for part in content)
    if total > max_chars:
        raise RequestRefused(
            413, f"the conversation holds {total:,} characters of text; the limit is {max_chars:,} (max_prompt_chars)"
        )


def log_client_gone(path: str, during: str) -> None:
    """One line, instead of a traceback, for a client that hung up."""
    log.info("client left %s %s; its work was dropped", during, path)


# ---------------------------------------------------------------- settings


def resolve_api_key(api_key: str | None, api_key_file: str | None, environ: dict[str, str]) -> str | None:
    """The key from the setting, else the file, else the VLM_INSPECT_API_KEY environment variable.

    Raises:
        ConfigError: the key file cannot be read or is empty, or both a key and a key file are given.
    """
    if api_key and api_key_file:
        raise ConfigError(["api_key, api_key_file: give one, not both"])
    if api_key_file:
        path = Path(api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError([f"api_key_file: {path}: cannot be read ({err})"]) from None
        if not key:
            raise ConfigError([f"api_key_file: {path}: is empty"])
        return key
    return api_key or environ.get(API_KEY_ENV) or None


class BodyLimit:
    """Refuse request bodies over `max_bytes`: by Content-Length at once, else while reading."""

    def __init__(self, app: Any, max_bytes: int, respond: Callable[[int, str], Any]):
        self.app = app
        self.max_bytes = max_bytes
        self.respond = respond

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = self.respond(413, f"request body of {int(declared):,} bytes is over the limit")
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)


class BodyTooLarge(Exception):
    """The request body grew past the limit while it was being read."""

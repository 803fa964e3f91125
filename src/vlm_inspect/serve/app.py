"""`vlm-inspect serve`: the tuned model as an inspection service for the line.

Routes: `POST /v1/inspect` (a verdict for one photo), `POST /v1/chat/completions` (OpenAI-compatible,
streaming or not), `GET /v1/models`, `GET /healthz`, and `GET /`, the operator page. One model
worker serves them all (see batcher.py). The server binds 127.0.0.1 unless told otherwise, checks an
API key in constant time, decodes every upload to prove it is an image, never opens a path or URL a
client names, and answers every error as JSON `{"error": {"message", "type"}}` without a traceback.
Every request is bounded in bytes, text and time, and work for clients that left is dropped (limits.py).

Run as: vlm-inspect serve --model M [--adapter A] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import ipaddress
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from PIL import Image

from vlm_inspect.config import ServeConfig, require
from vlm_inspect.data.images import load_image
from vlm_inspect.errors import ConfigError, DataError, VlmInspectError
from vlm_inspect.station.line_settings import line_problems

try:
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError as err:  # the `serve` extra is optional
    raise VlmInspectError(
        f"`vlm-inspect serve` needs FastAPI and uvicorn ({err.name} is not installed): pip install 'vlm-inspect[serve]'"
    ) from None

from vlm_inspect.serve.batcher import Batcher, QueueFull
from vlm_inspect.serve.limits import (
    BodyDeadline,
    ClientGone,
    HostCheck,
    NoSniff,
    RequestRefused,
    check_prompt_length,
    log_client_gone,
    resolve_api_key,
    until_client_leaves,
)
from vlm_inspect.serve.line_routes import line_router
from vlm_inspect.serve.station_routes import Recorder, station_router

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
PAGE_FILES |= {"history.html": "text/html", "history.js": "text/javascript"}
PAGE_FILES |= {"line.html": "text/html", "line.js": "text/javascript", "line.css": "text/css"}

# Larger than any line camera's frame (a 50 MP photo decodes to 150 MB); refused before decoding.
MAX_IMAGE_PIXELS = 50_000_000
# JSON carries the image as base64 (4/3 of its size) plus some text around it.
_BODY_SLACK_BYTES = 1 << 20
RETRY_AFTER_S = 1

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "unsupported_media_type",
    421: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "overloaded_error",
    504: "timeout_error",
}
_PAGE_HEADERS = {
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


class _BodyTooLarge(Exception):
    """The request body grew past the limit while it was being read."""


# ---------------------------------------------------------------- request bodies


class _InspectJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    describe: bool = False
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _ImageURL(BaseModel):
    url: str
    detail: str | None = None


class _ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: _ImageURL


class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[Union[_TextPart, _ImagePart], Field(discriminator="type")]] | None = None


class _ChatRequest(BaseModel):
    model: str | None = None
    messages: Annotated[list[_Message], Field(min_length=1)]
    stream: bool = False
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    # Greedy unless asked: an inspection answer should not change from one call to the next.
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    n: Annotated[int, Field(ge=1, le=1)] = 1


# ---------------------------------------------------------------- the app


def create_app(predictor: Any, cfg: ServeConfig) -> FastAPI:
    """The service around a loaded model; the model worker starts with the app's lifespan.

    Args:
        predictor: A loaded `vlm_inspect.predict.Predictor` (or anything with its methods).
        cfg: Server settings: threshold, batching, queue, upload and time limits, api_key.

    Returns:
        The FastAPI app, ready for uvicorn or a TestClient.
    """

    recorder = Recorder.for_serve(cfg, predictor)  # records nothing without --station / --db

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.batcher = Batcher(predictor, cfg.max_batch, cfg.max_queue, cfg.request_timeout_s)
        try:
            yield
        finally:
            await app.state.batcher.close()
            recorder.close()

    # No /docs: Swagger UI loads its code from a CDN, and the line PC may have no internet.
    app = FastAPI(title="vlm-inspect", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    max_upload = int(cfg.max_upload_mb * 1024 * 1024)
    app.add_middleware(_BodyLimit, max_bytes=max_upload * 4 // 3 + _BODY_SLACK_BYTES)
    app.add_middleware(BodyDeadline, timeout_s=cfg.body_timeout_s)
    guard(app, cfg.host, cfg.port)
    _add_api_routes(app, predictor, cfg, max_upload, recorder)
    _add_page_routes(app)
    auth = [Depends(_key_checker(cfg.api_key))]
    app.include_router(station_router(recorder.store, auth, _page_file, recorder.monitor.settings.sample))
    app.include_router(line_router(recorder.monitor, auth, _page_file))
    return app


def _add_api_routes(app: FastAPI, predictor: Any, cfg: ServeConfig, max_upload: int, recorder: Recorder) -> None:
    auth = [Depends(_key_checker(cfg.api_key))]
    # At most max_batch photos decode at once: each decode may hold up to ~0.9 GiB (data/images.py),
    # and 40 of them in the thread pool would add up before the queue limit turns anyone away.
    decode_slots = asyncio.Semaphore(cfg.max_batch)

    @app.get("/healthz")
    async def healthz(request: Request) -> dict:
        # Open without a key so probes work: load figures only, nothing about the model or its data.
        batcher: Batcher = request.app.state.batcher
        stats = batcher.stats
        return {"status": "ok", "waiting": batcher.waiting, "batches": stats.batches, "images_scored": stats.images}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(predictor)]}

    @app.post("/v1/inspect", dependencies=auth)
    async def inspect(request: Request) -> dict:
        started = time.perf_counter()
        data, describe, threshold = await _read_inspect_request(request, max_upload)
        threshold = cfg.threshold if threshold is None else threshold
        image = await _decode(data, "upload", decode_slots)
        batcher: Batcher = request.app.state.batcher
        p_ng = await until_client_leaves(request, batcher.score(image))
        answer: dict[str, Any] = {"verdict": "NG" if p_ng >= threshold else "OK", "p_ng": p_ng, "threshold": threshold}
        if describe:
            work = batcher.call(lambda: predictor.describe([image], max_new_tokens=cfg.max_new_tokens))
            texts = await until_client_leaves(request, work)
            answer["description"] = texts[0]
        answer["model"] = predictor.name
        answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        await recorder.inspected(request, data, image, answer)
        return answer

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request) -> Any:
        started = time.perf_counter()
        req = _validate(_ChatRequest, await _read_json(request))
        check_prompt_length(req.messages, cfg.max_prompt_chars)
        data, prompt = _conversation(req.messages, predictor, max_upload)
        image = await _decode(data, "image_url", decode_slots)
        max_new = min(req.max_completion_tokens or req.max_tokens or cfg.max_new_tokens, cfg.max_new_tokens)
        batcher: Batcher = request.app.state.batcher
        if req.stream:
            pieces = batcher.stream(lambda: predictor.stream(image, prompt, max_new, req.temperature))
            return await until_client_leaves(
                request, _stream_response(recorder.streamed(pieces, data, image), predictor.name)
            )
        work = batcher.call(lambda: predictor.generate([image], [prompt], max_new, req.temperature))
        texts = await until_client_leaves(request, work)
        await recorder.chatted(data, image, texts[0], started)
        return _completion(texts[0], predictor.name)


def _add_page_routes(app: FastAPI) -> None:
    # Fixed names only: the server never opens a path that a client names.
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return _page_file("index.html")

    @app.get("/static/app.js", include_in_schema=False)
    async def page_script() -> FileResponse:
        return _page_file("app.js")

    @app.get("/static/app.css", include_in_schema=False)
    async def page_style() -> FileResponse:
        return _page_file("app.css")


def _page_file(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers=_PAGE_HEADERS)


def _model_card(predictor: Any) -> dict:
    return {"id": predictor.name, "object": "model", "created": 0, "owned_by": "vlm-inspect"}


# ---------------------------------------------------------------- auth and limits


def _key_checker(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
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


class _BodyLimit:
    """Refuse request bodies over `max_bytes`: by Content-Length at once, else while reading."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = _error_response(413, f"request body of {int(declared):,} bytes is over the limit")
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------- reading requests


async def _read_inspect_request(request: Request, max_upload: int) -> tuple[bytes, bool, float | None]:
    """(image bytes, describe, threshold) from a multipart upload or a JSON body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = request.query_params
    if content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "multipart upload needs the photo in a file field named 'file'")
            data = await upload.read(max_upload + 1)
            fields = {**query, **{k: v for k, v in form.items() if isinstance(v, str)}}
        describe = _parse_bool("describe", fields.get("describe", "false"))
        threshold = _parse_threshold(fields.get("threshold"))
    elif content_type == "application/json":
        body = _validate(_InspectJSON, await _read_json(request))
        data = _base64_image(body.image, "image")
        describe = body.describe or _parse_bool("describe", query.get("describe", "false"))
        threshold = body.threshold if body.threshold is not None else _parse_threshold(query.get("threshold"))
    else:
        raise ApiError(
            415,
            f"content type {content_type or '(none)'} is not accepted: send multipart/form-data with a 'file' "
            'field, or application/json {"image": "<base64>"}',
        )
    _check_size(data, max_upload)
    return data, describe, threshold


async def _read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"body is not valid JSON ({err})") from None


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
        raise ApiError(422, problems) from None


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off", ""):
        return False
    raise ApiError(422, f"{name}: {value!r} is not true or false")


def _parse_threshold(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        threshold = float(value)
    except ValueError:
        raise ApiError(422, f"threshold: {value!r} is not a number") from None
    if not 0.0 <= threshold <= 1.0:
        raise ApiError(422, f"threshold: {threshold} is not between 0 and 1")
    return threshold


def _base64_image(text: str, where: str) -> bytes:
    """Bytes of a base64 image, given bare or as a `data:` URI."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: a data: URI must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: not valid base64") from None


def _check_size(data: bytes, max_upload: int) -> None:
    if len(data) > max_upload:
        raise ApiError(413, f"image is over the upload limit of {max_upload / 1024 / 1024:g} MB")


async def _decode(data: bytes, name: str, slots: asyncio.Semaphore) -> Image.Image:
    """The upload as an RGB image; decoded in a worker thread so big photos do not stall the server,
    holding one of `slots` so only a bounded number decode at once."""
    try:
        async with slots:
            return await run_in_threadpool(load_image, data, MAX_IMAGE_PIXELS, name)
    except DataError as err:
        raise ApiError(415, str(err)) from None


# ---------------------------------------------------------------- chat


def _conversation(messages: list[_Message], predictor: Any, max_upload: int) -> tuple[bytes, str]:
    """(image bytes, LLaVA prompt) from OpenAI chat messages holding exactly one image.

    System messages are left out: LLaVA-1.5 as tuned here has no system turn.
    """
    turns: list[list[Any]] = []  # [role, [texts]], consecutive messages of one role merged
    images: list[str] = []
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        texts, urls = _split_content(message.content)
        if urls and message.role == "assistant":
            raise ApiError(400, "images are accepted in user messages only")
        images.extend(urls)
        if turns and turns[-1][0] == message.role:
            turns[-1][1].extend(texts)
        else:
            turns.append([message.role, texts])
    if len(images) != 1:
        raise ApiError(400, f"send exactly one image (an image_url part with a data: URI); got {len(images)}")
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise ApiError(400, "the conversation must start and end with a user message")
    said = ["\n".join(t for t in texts if t.strip()) for _, texts in turns]
    questions, answers = said[0::2], said[1::2]
    questions[0] = questions[0] or predictor.default_question
    history = list(zip(questions[:-1], answers, strict=True))
    prompt = predictor.prompt(questions[-1], history)
    data = _image_url_bytes(images[0])
    _check_size(data, max_upload)
    return data, prompt


def _split_content(content: str | list | None) -> tuple[list[str], list[str]]:
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    texts = [part.text for part in content if isinstance(part, _TextPart)]
    urls = [part.image_url.url for part in content if isinstance(part, _ImagePart)]
    return texts, urls


def _image_url_bytes(url: str) -> bytes:
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a path"
        raise ApiError(
            400,
            f"image_url with {scheme!r} is refused: this server never fetches or opens what a client names; "
            "send the image inline as data:image/...;base64,...",
        )
    return _base64_image(url, "image_url")


def _completion(text: str, model: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


async def _stream_response(pieces: AsyncGenerator[str, None], model: str) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format; waits for the first piece so 503/504 keep their status."""
    first = await anext(pieces, None)
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(delta: dict, finish: str | None = None) -> str:
        chunk = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            yield event({"role": "assistant", "content": ""})
            if first:
                yield event({"content": first})
            async for piece in pieces:
                if piece:
                    yield event({"content": piece})
            yield event({}, "stop")
            yield "data: [DONE]\n\n"
        except Exception as err:  # the status line is sent; the error travels as the last event
            status, message = _status_of(err)
            body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error")}}
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            await pieces.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# ---------------------------------------------------------------- errors


def _status_of(err: Exception) -> tuple[int, str]:
    """HTTP status and client-safe message for an exception; unexpected ones say nothing inside."""
    if isinstance(err, (ApiError, RequestRefused)):
        return err.status, err.message
    if isinstance(err, (ClientGone, ClientDisconnect)):
        return 499, "the client closed the connection"
    if isinstance(err, QueueFull):
        return 503, f"the server is busy ({err}); retry in {RETRY_AFTER_S} s"
    if isinstance(err, asyncio.TimeoutError):  # the builtin TimeoutError from Python 3.11 on
        return 504, "the model did not answer within the request timeout"
    if isinstance(err, _BodyTooLarge):
        return 413, "request body is over the upload limit"
    if isinstance(err, HTTPException):
        return err.status_code, str(err.detail)
    return 500, "internal error while handling the request; the server log has the details"


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error")}}
    return JSONResponse(body, status_code=status, headers={**(headers or {}), "X-Content-Type-Options": "nosniff"})


def guard(app: FastAPI, host: str, port: int) -> None:
    """What every app of ours gets: loopback Host names only on a loopback bind (DNS rebinding), `nosniff`
    on every response, and errors as JSON."""
    if _is_loopback(host):
        app.add_middleware(HostCheck, port=port, respond=_error_response)
    app.add_middleware(NoSniff)
    _add_error_handlers(app)


def _add_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, err: Exception) -> JSONResponse:
        status, message = _status_of(err)
        if status == 499:  # one log line, not a traceback: nobody is left to read the answer
            log_client_gone(
                request.url.path, "mid-upload" if isinstance(err, ClientDisconnect) else "before its answer"
            )
        headers = dict(err.headers or {}) if isinstance(err, (ApiError, RequestRefused, HTTPException)) else {}
        if status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        return _error_response(status, message, headers or None)

    kinds = (ApiError, RequestRefused, ClientGone, ClientDisconnect, QueueFull, asyncio.TimeoutError, _BodyTooLarge)
    for kind in (*kinds, HTTPException, Exception):
        app.add_exception_handler(kind, handle)


# ---------------------------------------------------------------- running


def check_serve_config(cfg: ServeConfig) -> None:
    """Raise one ConfigError listing every unusable setting."""
    problems = require(cfg, "model")
    if not 1 <= cfg.port <= 65535:
        problems.append(f"port: {cfg.port} is not between 1 and 65535")
    if not 0.0 <= cfg.threshold <= 1.0:
        problems.append(f"threshold: {cfg.threshold} is not between 0 and 1")
    for name in ("max_batch", "max_queue", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name}: {getattr(cfg, name)} must be at least 1")
    if cfg.max_prompt_chars < 1:
        problems.append(f"max_prompt_chars: {cfg.max_prompt_chars} must be at least 1")
    for name in ("max_upload_mb", "request_timeout_s", "body_timeout_s"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name}: {getattr(cfg, name)} must be more than 0")
    if cfg.api_key is not None and not cfg.api_key.strip():
        problems.append("api_key: empty; leave it unset or give a key")
    problems += line_problems(cfg)
    if problems:
        raise ConfigError(problems)


def serve(cfg: ServeConfig) -> None:
    """Load the model once and serve it until interrupted.

    Args:
        cfg: Model, adapter, address and limits (see `ServeConfig`).

    Raises:
        ConfigError: a setting is unusable, or the address cannot be bound.
        ModelFolderError: the model or adapter folder cannot be loaded.
    """
    from vlm_inspect.predict import Predictor

    check_serve_config(cfg)
    cfg = dataclasses.replace(cfg, api_key=resolve_api_key(cfg.api_key, cfg.api_key_file, dict(os.environ)))
    sock = _bind(cfg.host, cfg.port)
    try:
        predictor = Predictor.load(
            cfg.model, cfg.adapter, cfg.device, dtype=cfg.precision, image_max_tokens=cfg.image_max_tokens
        )
        if predictor.device.type == "cuda":
            print("vlm-inspect serve: compiling for the GPU before the first request (1–3 minutes)", flush=True)
        predictor.warm_up(cfg.max_batch, cfg.max_new_tokens)
        app = create_app(predictor, cfg)
        _announce(cfg, predictor)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    """Claim the address before the model loads, so a busy port fails fast and clearly."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise ConfigError([f"host/port: cannot listen on {host}:{port} ({err.strerror or err})"]) from None
    return sock


def _announce(cfg: ServeConfig, predictor: Any) -> None:
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{shown}:{cfg.port}"
    print(f"vlm-inspect serve: model {predictor.name} at {url}", flush=True)
    print(f"  operator page {url}/   inspect POST {url}/v1/inspect   OpenAI API {url}/v1", flush=True)
    if not _is_loopback(cfg.host) and not cfg.api_key:
        print(
            f"  warning: listening on {cfg.host} without an API key: anyone who can reach this machine can use it",
            file=sys.stderr,
            flush=True,
        )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

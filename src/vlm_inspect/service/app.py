"""The service's app: `POST /v1/inspect` (a verdict for one photo), `POST /v1/chat/completions` (OpenAI-compatible,
streaming or not; openai.py), `GET /v1/models`, `GET /healthz`, the operator page at `/` and the station's routes.

One model worker serves them all (batcher.py). Every upload is decoded to prove it is an image, no path or URL a
client names is ever opened, every error is JSON `{"error": {"message", "type"}}` without a traceback (http.py),
and every request is bounded in bytes, text and time, with work for clients that left dropped (limits.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from vlm_inspect.config import ServeConfig
from vlm_inspect.data.images import load_image
from vlm_inspect.errors import DataError
from vlm_inspect.service.batcher import Batcher
from vlm_inspect.service.http import (
    ApiError,
    base64_image,
    check_size,
    error_response,
    guard,
    key_checker,
    page_file,
    read_json,
    validate_body,
)
from vlm_inspect.service.limits import BodyDeadline, BodyLimit, check_prompt_length, until_client_leaves
from vlm_inspect.service.line_routes import line_router
from vlm_inspect.service.openai import ChatRequest, completion, conversation, stream_response
from vlm_inspect.service.station_routes import Recorder, station_router

ASKED = ("describe", "locate")
"""What /v1/inspect generates on request besides the one-pass score."""
# Larger than any line camera's frame (a 50 MP photo decodes to 150 MB); refused before decoding.
MAX_IMAGE_PIXELS = 50_000_000
# JSON carries the image as base64 (4/3 of its size) plus some text around it.
_BODY_SLACK_BYTES = 1 << 20


# ---------------------------------------------------------------- request bodies


class _InspectJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    describe: bool = False
    locate: bool = False
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


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
    app.add_middleware(BodyLimit, max_bytes=max_upload * 4 // 3 + _BODY_SLACK_BYTES, respond=error_response)
    app.add_middleware(BodyDeadline, timeout_s=cfg.body_timeout_s)
    guard(app, cfg.host, cfg.port)
    _add_api_routes(app, predictor, cfg, max_upload, recorder)
    _add_page_routes(app)
    auth = [Depends(key_checker(cfg.api_key))]
    app.include_router(station_router(recorder.store, auth, page_file, recorder.monitor.settings.sample))
    app.include_router(line_router(recorder.monitor, auth, page_file))
    return app


def _add_api_routes(app: FastAPI, predictor: Any, cfg: ServeConfig, max_upload: int, recorder: Recorder) -> None:
    auth = [Depends(key_checker(cfg.api_key))]
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
        data, asked, threshold = await _read_inspect_request(request, max_upload)
        threshold = cfg.threshold if threshold is None else threshold
        image = await _decode(data, "upload", decode_slots)
        batcher: Batcher = request.app.state.batcher
        p_ng = await until_client_leaves(request, batcher.score(image))
        answer: dict[str, Any] = {"verdict": "NG" if p_ng >= threshold else "OK", "p_ng": p_ng, "threshold": threshold}
        if asked:  # describe and/or locate: generated answers, their boxes in the upload's pixels
            answer |= await until_client_leaves(request, batcher.call(lambda: _answered(predictor, image, asked, cfg)))
        answer["model"] = predictor.name
        answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        await recorder.inspected(request, data, image, answer)
        return answer

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request) -> Any:
        started = time.perf_counter()
        req = validate_body(ChatRequest, await read_json(request))
        check_prompt_length(req.messages, cfg.max_prompt_chars)
        data, prompt = conversation(req.messages, predictor, max_upload)
        image = await _decode(data, "image_url", decode_slots)
        max_new = min(req.max_completion_tokens or req.max_tokens or cfg.max_new_tokens, cfg.max_new_tokens)
        batcher: Batcher = request.app.state.batcher
        if req.stream:
            pieces = batcher.stream(lambda: predictor.stream(image, prompt, max_new, req.temperature))
            return await until_client_leaves(
                request, stream_response(recorder.streamed(pieces, data, image), predictor.name)
            )
        work = batcher.call(lambda: predictor.generate([image], [prompt], max_new, req.temperature))
        texts = await until_client_leaves(request, work)
        defects = predictor.read_answer(texts[0], image).defects
        await recorder.chatted(data, image, texts[0], started, defects)
        return completion(texts[0], predictor.name, defects)


def _add_page_routes(app: FastAPI) -> None:
    # Fixed names only: the server never opens a path that a client names.
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return page_file("index.html")

    @app.get("/static/app.js", include_in_schema=False)
    async def page_script() -> FileResponse:
        return page_file("app.js")

    @app.get("/static/app.css", include_in_schema=False)
    async def page_style() -> FileResponse:
        return page_file("app.css")


def _model_card(predictor: Any) -> dict:
    return {"id": predictor.name, "object": "model", "created": 0, "owned_by": "vlm-inspect"}


# ---------------------------------------------------------------- auth and limits


# ---------------------------------------------------------------- reading requests


async def _read_inspect_request(request: Request, max_upload: int) -> tuple[bytes, set[str], float | None]:
    """(image bytes, what to generate besides the score: {"describe", "locate"}, threshold) from a multipart
    upload or a JSON body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = request.query_params
    if content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "multipart upload needs the photo in a file field named 'file'")
            data = await upload.read(max_upload + 1)
            fields = {**query, **{k: v for k, v in form.items() if isinstance(v, str)}}
        asked = {name for name in ASKED if _parse_bool(name, fields.get(name, "false"))}
        threshold = _parse_threshold(fields.get("threshold"))
    elif content_type == "application/json":
        body = validate_body(_InspectJSON, await read_json(request))
        data = base64_image(body.image, "image")
        asked = {name for name in ASKED if getattr(body, name) or _parse_bool(name, query.get(name, "false"))}
        threshold = body.threshold if body.threshold is not None else _parse_threshold(query.get("threshold"))
    else:
        raise ApiError(
            415,
            f"content type {content_type or '(none)'} is not accepted: send multipart/form-data with a 'file' "
            'field, or application/json {"image": "<base64>"}',
        )
    check_size(data, max_upload)
    return data, asked, threshold


def _answered(predictor: Any, image: Image.Image, asked: set[str], cfg: ServeConfig) -> dict[str, Any]:
    """The generated part of an inspection: the description (boxes taken out), and the defects in the photo's
    pixels, from the locate answer when asked for, else from the description."""
    out: dict[str, Any] = {}
    if "describe" in asked:
        described = predictor.answers([image], max_new_tokens=cfg.max_new_tokens)[0]
        out.update(description=described.text, defects=described.defects, boxes_dropped=described.boxes_dropped)
    if "locate" in asked:
        located = predictor.locate([image], max_new_tokens=cfg.max_new_tokens)[0]
        out.update(defects=located.defects, boxes_dropped=located.boxes_dropped)
    return out


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


async def _decode(data: bytes, name: str, slots: asyncio.Semaphore) -> Image.Image:
    """The upload as an RGB image; decoded in a worker thread so big photos do not stall the server,
    holding one of `slots` so only a bounded number decode at once."""
    try:
        async with slots:
            return await run_in_threadpool(load_image, data, MAX_IMAGE_PIXELS, name)
    except DataError as err:
        raise ApiError(415, str(err)) from None


# ---------------------------------------------------------------- chat


# ---------------------------------------------------------------- errors


# ---------------------------------------------------------------- running

"""The service's app: `POST /v1/inspect` (a verdict for one photo), `POST /v1/chat/completions` (OpenAI-compatible,
streaming or not; openai.py), `GET /v1/models`, `GET /v1/reference` (the model's known-good reference photos),
`GET /healthz`, the operator page at `/` and the station's routes.

Each verdict is judged against the model's references unless the request names others (`reference`: `none`, or
known-good photos uploaded with it; in chat, the images before the last), and its answer says which (`reference`).

One model worker serves them all (batcher.py). Every upload is decoded to prove it is an image, no path or URL a
client names is ever opened, every error is JSON `{"error": {"message", "type"}}` without a traceback (http.py),
and every request is bounded in bytes, text and time, with work for clients that left dropped (limits.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from vlm_inspect.config import ServeConfig
from vlm_inspect.data.images import load_image
from vlm_inspect.data.reference import MAX_REFERENCES, NO_REFERENCE, Reference
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
from vlm_inspect.service.references import reference_photo, references_of
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
    # "none": the photo alone; "model" or unset: the model's own references; a list: known-good photos (base64).
    reference: (
        Literal["none", "model"] | Annotated[list[str], Field(min_length=1, max_length=MAX_REFERENCES)] | None
    ) = None


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
    sample = recorder.monitor.settings.sample
    app.include_router(station_router(recorder.store, auth, page_file, sample, predictor.product))
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

    @app.get("/v1/reference", dependencies=auth)
    async def reference() -> dict:
        """The known-good photos every inspection is judged against unless it names others: the station's golden
        set for the product when one is in force, else the model's own."""
        return {"reference": predictor.reference_for(await recorder.against()).record()}

    @app.get("/v1/reference/{index}", dependencies=auth)
    async def reference_image(index: int) -> Response:
        return reference_photo(predictor.reference_for(await recorder.against()), index)

    @app.post("/v1/inspect", dependencies=auth)
    async def inspect(request: Request) -> dict:
        started = time.perf_counter()
        data, asked, threshold, named = await _read_inspect_request(request, max_upload)
        threshold = cfg.threshold if threshold is None else threshold
        image = await _decode(data, "upload", decode_slots)
        against = await _reference(named, decode_slots)
        against = await recorder.against() if against is None else against  # named ones, else the station's
        batcher: Batcher = request.app.state.batcher
        p_ng = await until_client_leaves(request, batcher.score(image, against))
        answer: dict[str, Any] = {"verdict": "NG" if p_ng >= threshold else "OK", "p_ng": p_ng, "threshold": threshold}
        if asked:  # describe and/or locate: generated answers, their boxes in the upload's pixels
            work = batcher.call(lambda: _answered(predictor, image, asked, cfg, against))
            answer |= await until_client_leaves(request, work)
        answer["reference"] = predictor.reference_for(against).record()
        answer["model"] = predictor.name
        answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        await recorder.inspected(request, data, image, answer)
        return answer

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request) -> Any:
        started = time.perf_counter()
        req = validate_body(ChatRequest, await read_json(request))
        check_prompt_length(req.messages, cfg.max_prompt_chars)
        chat = conversation(req.messages, predictor, max_upload)
        data = chat.photo
        image = await _decode(data, "image_url", decode_slots)
        # Images before the last are known-good references (MMAD's "the first image is a normal sample"); with one
        # image, the model's own references.
        against = await _reference(references_of(chat.references), decode_slots)
        against = await recorder.against() if against is None else against
        used = predictor.reference_for(against).record()
        prompt = predictor.prompt(chat.question, chat.history, against)
        max_new = min(req.max_completion_tokens or req.max_tokens or cfg.max_new_tokens, cfg.max_new_tokens)
        batcher: Batcher = request.app.state.batcher
        if req.stream:
            pieces = batcher.stream(lambda: predictor.stream(image, prompt, max_new, req.temperature, against))
            return await until_client_leaves(
                request, stream_response(recorder.streamed(pieces, data, image, used), predictor.name)
            )
        work = batcher.call(lambda: predictor.generate([image], [prompt], max_new, req.temperature, against))
        texts = await until_client_leaves(request, work)
        defects = predictor.read_answer(texts[0], image).defects
        await recorder.chatted(data, image, texts[0], started, defects, used)
        return completion(texts[0], predictor.name, defects, used)


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


NamedReference = str | list[tuple[str, bytes]] | None
"""What a request says to judge against: None (the model's own references), "none", or uploaded (name, bytes)."""


async def _read_inspect_request(
    request: Request, max_upload: int
) -> tuple[bytes, set[str], float | None, NamedReference]:
    """(image bytes, what to generate besides the score: {"describe", "locate"}, threshold, the references named)
    from a multipart upload or a JSON body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = request.query_params
    if content_type == "multipart/form-data":
        async with request.form(max_files=1 + MAX_REFERENCES, max_fields=8) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "multipart upload needs the photo in a file field named 'file'")
            data = await upload.read(max_upload + 1)
            named = await _form_reference(form.getlist("reference"), query.get("reference"), max_upload)
            fields = {**query, **{k: v for k, v in form.items() if isinstance(v, str)}}
        asked = {name for name in ASKED if _parse_bool(name, fields.get(name, "false"))}
        threshold = _parse_threshold(fields.get("threshold"))
    elif content_type == "application/json":
        body = validate_body(_InspectJSON, await read_json(request))
        data = base64_image(body.image, "image")
        asked = {name for name in ASKED if getattr(body, name) or _parse_bool(name, query.get(name, "false"))}
        threshold = body.threshold if body.threshold is not None else _parse_threshold(query.get("threshold"))
        named = _json_reference(body.reference if body.reference is not None else query.get("reference"))
    else:
        raise ApiError(
            415,
            f"content type {content_type or '(none)'} is not accepted: send multipart/form-data with a 'file' "
            'field, or application/json {"image": "<base64>"}',
        )
    sent = [photo for _, photo in named] if isinstance(named, list) else []
    check_size(b"".join([data, *sent]), max_upload)  # the photo and its references share the upload limit
    return data, asked, threshold, named


async def _form_reference(values: list[Any], query: str | None, max_upload: int) -> NamedReference:
    """A multipart request's `reference`: uploaded photo files (up to MAX_REFERENCES), or the text none / model."""
    files = [v for v in values if isinstance(v, UploadFile)]
    texts = [v for v in values if isinstance(v, str)] + ([query] if query is not None else [])
    if files and texts:
        raise ApiError(422, "reference: send known-good photo files or the word none, not both")
    if files:
        return [(f.filename or f"reference {n}", await f.read(max_upload + 1)) for n, f in enumerate(files, 1)]
    return _reference_word(texts[-1]) if texts else None


def _json_reference(value: str | list[str] | None) -> NamedReference:
    if isinstance(value, list):
        return [(f"reference {n}", base64_image(text, f"reference[{n - 1}]")) for n, text in enumerate(value, 1)]
    return _reference_word(value) if value is not None else None


def _reference_word(value: str) -> str | None:
    word = value.strip().lower()
    if word in ("none", "model", ""):
        return "none" if word == "none" else None
    raise ApiError(422, f"reference: {value!r} is neither none nor model (or send known-good photos)")


async def _reference(named: NamedReference, slots: asyncio.Semaphore) -> Reference | None:
    """The references a request names, decoded like any upload (415 for one that is no usable image)."""
    if named is None:
        return None
    if named == "none":
        return NO_REFERENCE
    try:
        async with slots:
            return await run_in_threadpool(Reference.from_bytes, "upload", named)
    except DataError as err:
        raise ApiError(415, f"reference: {err}") from None


def _answered(
    predictor: Any, image: Image.Image, asked: set[str], cfg: ServeConfig, reference: Reference | None = None
) -> dict[str, Any]:
    """The generated part of an inspection: the description (boxes taken out), and the defects in the photo's
    pixels, from the locate answer when asked for, else from the description."""
    out: dict[str, Any] = {}
    if "describe" in asked:
        described = predictor.answers([image], max_new_tokens=cfg.max_new_tokens, reference=reference)[0]
        out.update(description=described.text, defects=described.defects, boxes_dropped=described.boxes_dropped)
    if "locate" in asked:
        located = predictor.locate([image], max_new_tokens=cfg.max_new_tokens, reference=reference)[0]
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

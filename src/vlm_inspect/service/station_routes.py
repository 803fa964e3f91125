"""The station behind `serve --station DIR` and `label`: recording inspections, history, review, CSV, label queue.

Routes (all but the pages need the API key when one is set):
`GET /history` (the history, review and labelling page), `GET /v1/station/records` (filtered list),
`GET /v1/station/records.csv` (the same view as CSV), `GET /v1/station/records/{id}` (one record with
its reviews), `GET /v1/station/records/{id}/photo` (the photo's bytes), `POST /v1/station/records/{id}/reviews`
(an operator's review), `GET /v1/station/queue?order=` (the labeller's queue: oldest, least-sure,
disagreements or audit first; station/queue.py). The list and the CSV take `order=` and `line=` too.
`GET /v1/station/golden?product=` (the product's golden set in force), `PUT /v1/station/golden` (a new set from
records an operator confirmed OK; no records: cleared; station/references.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from vlm_inspect.config import ServeConfig
from vlm_inspect.data.prompts import parse_verdict
from vlm_inspect.errors import DataError, StationError
from vlm_inspect.service.http import error_response, guard, key_checker, page_file, validation_problems
from vlm_inspect.service.limits import BodyLimit
from vlm_inspect.service.params import QueryReader
from vlm_inspect.station.audit import AuditSample
from vlm_inspect.station.baselines import keep_report, read_report
from vlm_inspect.station.history import HistoryFilter, all_records, csv_text, get_record, list_records, models_seen
from vlm_inspect.station.identity import model_identity
from vlm_inspect.station.line_settings import LineSettings
from vlm_inspect.station.monitor import LineMonitor
from vlm_inspect.station.references import GoldenSource, golden_set, set_golden
from vlm_inspect.station.store import MAX_DESCRIPTION_CHARS, MAX_OPERATOR_CHARS, StationStore, open_store

SOURCE_HEADER = "x-inspect-source"
FILE_HEADER = "x-inspect-file"
_PHOTO_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp", ".tif": "image/tiff"}
_PHOTO_TYPES |= {".webp": "image/webp", ".gif": "image/gif"}
LABEL_BODY_BYTES = 2 * 1024**2
"""Largest request body the labeller takes: a review with every box it may hold is under 0.1 MB."""
log = logging.getLogger("vlm_inspect.serve")


class Recorder:
    """Writes each inspection the server answers into the station store (a no-op without a station)."""

    def __init__(
        self,
        store: StationStore | None,
        model_name: str = "",
        model_hash: str | None = None,
        monitor: LineMonitor | None = None,
        line: str | None = None,
        golden: GoldenSource | None = None,
    ):
        self.store, self.model_name, self.model_hash, self.line = store, model_name, model_hash, line
        self.monitor = monitor or LineMonitor(store, LineSettings())  # metrics, and drift checks with a store
        self.golden = golden or GoldenSource(None, "product")

    @classmethod
    def for_serve(cls, cfg: ServeConfig, predictor: Any) -> Recorder:
        settings = LineSettings.of(cfg)
        if not cfg.station and not cfg.db:
            return cls(None, predictor.name, monitor=LineMonitor(None, settings), line=cfg.line)
        store, model_hash = open_store(cfg.station, cfg.db), model_identity(cfg.model, cfg.adapter)[1]
        if cfg.baseline:
            keep_report(store, model_hash, predictor.name, read_report(cfg.baseline))
        golden = GoldenSource(store, predictor.product, enabled=cfg.reference == "run")  # unless --reference names
        return cls(store, predictor.name, model_hash, LineMonitor(store, settings), cfg.line, golden)

    async def against(self) -> Any:
        """The station's golden set for the product when one is in force, else None (the model's own references).
        A set whose stored photos cannot be read is logged and left out; each record says what was used."""
        try:
            return await run_in_threadpool(self.golden.current)
        except (StationError, DataError) as err:
            log.warning("the station's golden set for %r cannot be used: %s", self.golden.product, err)
            return None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    async def inspected(self, request: Request, data: bytes, image: Image.Image, answer: dict) -> None:
        """Record a /v1/inspect answer and add its `record_id` to it."""
        source = "page" if request.headers.get(SOURCE_HEADER, "").lower() == "page" else "api"
        self.monitor.answered(self.line or source, self.model_name, answer["verdict"], answer.get("latency_ms"))
        if self.store is None:
            return
        kept = ("verdict", "p_ng", "threshold", "description", "latency_ms", "defects", "boxes_dropped", "reference")
        fields = {k: answer.get(k) for k in kept}
        answer["record_id"] = await self._record(data, image, _upload_name(request), source, fields)

    async def chatted(
        self,
        data: bytes,
        image: Image.Image,
        text: str,
        started: float,
        defects: list[dict] | None = None,
        reference: dict | None = None,
    ) -> None:
        """Record an OpenAI-route answer about an image: the verdict it starts with, the text, its boxes and the
        reference it was judged against (`Reference.record()`)."""
        fields = {
            "verdict": parse_verdict(text),
            "description": text,
            "latency_ms": _since(started),
            "defects": defects,
            "reference": reference,
        }
        self.monitor.answered(self.line or "chat", self.model_name, fields["verdict"], fields["latency_ms"])
        if self.store is None:
            return
        await self._record(data, image, "image_url", "chat", fields)

    async def streamed(
        self, pieces: AsyncGenerator[str, None], data: bytes, image: Image.Image, reference: dict | None = None
    ) -> AsyncGenerator[str, None]:
        """Pass a streamed answer through and record it once it is complete."""
        started, said = time.perf_counter(), []
        try:
            async for piece in pieces:
                said.append(piece)
                yield piece
        finally:
            await pieces.aclose()
        await self.chatted(data, image, "".join(said), started, reference=reference)

    async def _record(self, data: bytes, image: Image.Image, name: str, source: str, fields: dict) -> int | None:
        fields |= {"model_name": self.model_name, "model_hash": self.model_hash, "line": self.line}
        try:
            record_id = await run_in_threadpool(self.store.record, data, image, file_name=name, source=source, **fields)
        except StationError as err:
            raise HTTPException(507, f"the inspection was not recorded: {err}") from None
        await run_in_threadpool(self.monitor.maybe_check)
        return record_id


def _upload_name(request: Request) -> str:
    """The photo's file name: the X-Inspect-File header (URL-encoded), else the multipart file name."""
    named = unquote(request.headers.get(FILE_HEADER, "")).strip()
    form = getattr(request, "_form", None)  # Starlette keeps the parsed form on the request
    upload = form.get("file") if form is not None else None
    name = named or getattr(upload, "filename", None) or "upload"
    return name.replace("\\", "/").rsplit("/", 1)[-1] or "upload"


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


class _ReviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verdict: str
    operator: Annotated[str, Field(max_length=MAX_OPERATOR_CHARS)]
    defect_type: Annotated[str, Field(max_length=80)] | None = None
    boxes: list[list[float]] = []  # how many: store.review_problems (MAX_REVIEW_BOXES)
    description: Annotated[str, Field(max_length=MAX_DESCRIPTION_CHARS)] | None = None


class _GoldenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    record_ids: Annotated[list[int], Field(max_length=64)]  # how many a set holds: references.set_golden
    operator: Annotated[str, Field(max_length=MAX_OPERATOR_CHARS)]
    product: Annotated[str, Field(max_length=80)] | None = None


def station_router(
    store: StationStore | None,
    auth: list,
    page: Callable[[str], Response],
    sample: AuditSample = AuditSample(),
    product: str | None = None,
) -> APIRouter:
    """History, review, CSV, label-queue and golden-set routes over `store` (`sample`: the audit order's;
    `product`: the served model's, the golden routes' default); 404 without a store."""
    router = APIRouter()

    @router.get("/history", include_in_schema=False)
    async def history_page() -> Response:
        return page("history.html")

    @router.get("/static/history.js", include_in_schema=False)
    async def history_script() -> Response:
        return page("history.js")

    def need() -> StationStore:
        if store is None:
            raise HTTPException(404, "this server records nothing: start it with --station DIR to keep a history")
        return store

    @router.get("/v1/station/records", dependencies=auth)
    async def records(request: Request) -> dict:
        flt = _filter(request, sample)
        rows, total = await run_in_threadpool(_checked, list_records, need(), flt)
        models = await run_in_threadpool(models_seen, need())
        return {"records": rows, "total": total, "models": models}

    @router.get("/v1/station/records.csv", dependencies=auth)
    async def records_csv(request: Request) -> Response:
        rows = await run_in_threadpool(_checked, all_records, need(), _filter(request, sample))
        headers = {"Content-Disposition": 'attachment; filename="inspections.csv"'}
        return Response(csv_text(rows), media_type="text/csv; charset=utf-8", headers=headers)

    @router.get("/v1/station/queue", dependencies=auth)
    async def queue(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
        flt = replace(_filter(request, sample, "oldest"), queue=True, limit=limit, offset=0)
        rows, total = await run_in_threadpool(_checked, list_records, need(), flt)
        return {"ids": [r["id"] for r in rows], "left": total}

    @router.get("/v1/station/records/{record_id}", dependencies=auth)
    async def record(record_id: int) -> dict:
        return await run_in_threadpool(_found, need(), record_id)

    @router.get("/v1/station/records/{record_id}/photo", dependencies=auth)
    async def photo(record_id: int) -> Response:
        found = await run_in_threadpool(_found, need(), record_id)
        try:  # the bytes served are the ones just checked against the record's content hash
            data = await run_in_threadpool(need().read_photo, found["photo_sha256"], found["photo_suffix"])
        except StationError as err:
            raise HTTPException(410, f"record {record_id}: {err}") from None
        media = _PHOTO_TYPES.get(found["photo_suffix"], "application/octet-stream")
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=86400"})

    @router.post("/v1/station/records/{record_id}/reviews", dependencies=auth)
    async def review(record_id: int, request: Request) -> dict:
        body = _review_body(await request.body())
        await run_in_threadpool(_found, need(), record_id)
        try:
            review_id = await run_in_threadpool(need().review, record_id, **body.model_dump())
        except StationError as err:
            raise HTTPException(422, str(err)) from None
        return {"review_id": review_id, "record": await run_in_threadpool(_found, need(), record_id)}

    def product_of(named: str | None) -> str:
        if named and named.strip():
            return named.strip()
        if product is None:
            raise HTTPException(422, "product: name the product (this server has no model to take it from)")
        return product

    @router.get("/v1/station/golden", dependencies=auth)
    async def golden(name: Annotated[str | None, Query(alias="product", max_length=80)] = None) -> dict:
        which = product_of(name)
        found = await run_in_threadpool(_checked, golden_set, need(), which)
        return {"product": which, "golden": found.as_dict() if found else None}

    @router.put("/v1/station/golden", dependencies=auth)
    async def choose_golden(request: Request) -> dict:
        body = _validated(_GoldenBody, await request.body())
        which = product_of(body.product)
        found = await run_in_threadpool(_checked, set_golden, need(), which, body.record_ids, body.operator)
        return {"product": which, "golden": found.as_dict() if found else None}

    return router


def _review_body(raw: bytes) -> _ReviewBody:
    return _validated(_ReviewBody, raw)


def _validated(model: type[BaseModel], raw: bytes) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise HTTPException(422, validation_problems(err.errors())) from None


def _filter(request: Request, sample: AuditSample, order: str = "newest") -> HistoryFilter:
    """A HistoryFilter from query parameters (`order` unless one is given); 422 listing every bad one."""
    read = QueryReader(request.query_params)
    flt = HistoryFilter(
        **{name: read.text(name) for name in ("verdict", "review", "model", "source", "line")},
        order=read.text("order") or order,
        sample=sample,
        p_min=read.number("p_min"),
        p_max=read.number("p_max"),
        since=read.day("since"),
        until=read.day("until"),
        limit=read.integer("limit", 200),
        offset=read.integer("offset", 0),
    )
    problems = read.problems + flt.problems()
    if problems:
        raise HTTPException(422, "; ".join(problems))
    return flt


def _checked(fn: Callable, *args: Any) -> Any:
    try:
        return fn(*args)
    except StationError as err:
        raise HTTPException(422, str(err)) from None


def _found(store: StationStore, record_id: int) -> dict:
    try:
        return get_record(store, record_id)
    except StationError:
        raise HTTPException(404, f"no record with id {record_id}") from None


def label_app(store: StationStore, api_key: str | None, host: str = "127.0.0.1", port: int = 8000) -> FastAPI:
    """The labeller: the station routes and the page, without a model."""
    from vlm_inspect.service.line_routes import line_router

    app = FastAPI(title="vlm-inspect label", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=LABEL_BODY_BYTES, respond=error_response)
    guard(app, host, port)
    auth, monitor = [Depends(key_checker(api_key))], LineMonitor(store, LineSettings())
    app.include_router(station_router(store, auth, page_file, monitor.settings.sample))
    app.include_router(line_router(monitor, auth, page_file))

    @app.get("/", include_in_schema=False)
    async def start() -> RedirectResponse:
        return RedirectResponse("/history?label=1")

    @app.get("/static/app.css", include_in_schema=False)
    async def style() -> FileResponse:
        return page_file("app.css")

    return app

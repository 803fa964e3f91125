"""The line view's routes on `serve` (and `label`): the page, its data, drift health and Prometheus metrics.

`GET /line` (the page; no data in it), `GET /v1/station/line?since=&until=&period=&line=&model=`
(p-charts, run rules, latency, recent p(NG) against the reference, audit estimates; charts as SVG
text), `GET /v1/station/health` (the drift check of every active line and model, run now), and
`GET /metrics` (Prometheus text format). All but the page need the API key when one is set.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from vlm_inspect.errors import StationError
from vlm_inspect.service.params import QueryReader
from vlm_inspect.station.lineview import LineQuery, line_view
from vlm_inspect.station.metrics import CONTENT_TYPE
from vlm_inspect.station.monitor import LineMonitor

DEFAULT_DAYS = 7


def line_router(monitor: LineMonitor, auth: list, page: Callable[[str], Response]) -> APIRouter:
    """Line page, line data, health and metrics over the monitor's store (404 without one, but /metrics)."""
    router = APIRouter()

    for name in ("line.html", "line.js", "line.css"):
        path = "/line" if name == "line.html" else f"/static/{name}"
        router.add_api_route(path, _page_route(page, name), methods=["GET"], include_in_schema=False)

    def need() -> Any:
        if monitor.store is None:
            raise HTTPException(404, "this server records nothing: start it with --station DIR for the line view")
        return monitor.store

    @router.get("/v1/station/line", dependencies=auth)
    async def line(request: Request) -> dict:
        query = _line_query(request, monitor)
        try:
            return await run_in_threadpool(line_view, need(), query, monitor.settings)
        except StationError as err:
            raise HTTPException(422, str(err)) from None

    @router.get("/v1/station/health", dependencies=auth)
    async def health() -> dict:
        need()
        return await run_in_threadpool(monitor.check)

    @router.get("/metrics", dependencies=auth)
    async def metrics(request: Request) -> Response:
        batcher = getattr(request.app.state, "batcher", None)  # serve's model queue (label has none)
        monitor.metrics.queue.set(batcher.waiting if batcher is not None else 0)
        body = await run_in_threadpool(monitor.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    return router


def _page_route(page: Callable[[str], Response], name: str) -> Callable:
    async def serve_page() -> Response:
        return page(name)

    return serve_page


def _line_query(request: Request, monitor: LineMonitor) -> LineQuery:
    """A LineQuery from query parameters (default: the last seven local days, by shift); 422 naming each bad one."""
    read = QueryReader(request.query_params)
    until = read.day("until", datetime.now(monitor.settings.zone).date())
    since = read.day("since", date.fromordinal(max(until.toordinal() - (DEFAULT_DAYS - 1), 1)))
    query = LineQuery(since, until, read.text("period") or "shift", read.text("line"), read.text("model"))
    problems = read.problems + query.problems(len(monitor.settings.shift_hours))
    if problems:
        raise HTTPException(422, "; ".join(problems))
    return query

"""Load on `vlm-inspect serve`: latency and throughput of POST /v1/inspect, with and without batching and recording.

Starts the server on 127.0.0.1 (the tiny model unless --model is given) once per --max-batch value
and --record setting (off, or on: `serve --station DIR` records every inspection), sends --requests
photos at --concurrency, prints errors, p50/p99 latency and throughput, and with recording on the
bytes the station stored per 1,000 inspections (database and photo files); then stops the server.
Every request sends a different photo, as a line camera does, so the store cannot deduplicate them.
With --url it loads a running server instead; only loopback addresses are accepted.

Run: python benchmarks/serve_load.py [--requests 500] [--concurrency 16] [--max-batch 8,1] [--record off,on]
     [--model M | --url U]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

WARMUP_REQUESTS = 8
REQUEST_TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0


def photos(n: int = 8, seed: int = 0) -> list[bytes]:
    """n different 640x480 JPEGs: a light box on a noisy background, every other one with a dark spot."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(20, 80, size=(480, 640, 3), dtype=np.uint8)
        pixels[120:360, 160:480] = 220
        if i % 2:
            pixels[200:230, 250:280] = 30
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def load(url: str, n: int, concurrency: int, images: list[bytes]) -> dict:
    """Send n requests, at most `concurrency` at a time; latencies in ms and errors by kind."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:

        async def one(i: int) -> None:
            async with gate:
                start = time.perf_counter()
                try:
                    r = await client.post("/v1/inspect", files={"file": (f"{i}.jpg", images[i % len(images)])})
                    kind = None if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as err:
                    kind = type(err).__name__
                if kind:
                    errors[kind] = errors.get(kind, 0) + 1
                else:
                    latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(one(i) for i in range(WARMUP_REQUESTS)))
        latencies.clear()
        before = (await client.get("/healthz")).json()
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        seconds = time.perf_counter() - start
        after = (await client.get("/healthz")).json()
    batches = after.get("batches", 0) - before.get("batches", 0)
    return {"latencies": latencies, "errors": errors, "seconds": seconds, "n": n, "batches": batches}


def report(label: str, result: dict) -> None:
    lat = np.array(result["latencies"]) if result["latencies"] else np.array([np.nan])
    errors = sum(result["errors"].values())
    detail = f" ({', '.join(f'{k}: {v}' for k, v in result['errors'].items())})" if errors else ""
    per_batch = (result["n"] - errors) / result["batches"] if result["batches"] else float("nan")
    print(
        f"{label:<24} requests {result['n']}  errors {errors}{detail}  "
        f"p50 {np.percentile(lat, 50):7.1f} ms  p99 {np.percentile(lat, 99):7.1f} ms  "
        f"throughput {result['n'] / result['seconds']:6.1f} req/s  mean batch {per_batch:.2f}",
        flush=True,
    )


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise SystemExit(f"{url}: this load script only talks to this machine (127.0.0.1, ::1, localhost)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(model: Path, max_batch: int, station: Path | None = None):
    """`vlm-inspect serve` on a free loopback port (recording into `station` when given); stopped when the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "vlm_inspect.cli", "serve", "--model", str(model), "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--device", "cpu"]
    command += ["--station", str(station)] if station else []
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}:\n{process.stderr.read()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server at {url} did not start within {START_TIMEOUT_S:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", default="8,1", help="comma-separated values, one server run each")
    parser.add_argument("--model", type=Path, help="model folder (default: a freshly built tiny model)")
    parser.add_argument("--url", help="load this running server instead of starting one (loopback only)")
    parser.add_argument("--record", default="off,on", help="comma-separated off/on: serve without or with --station")
    args = parser.parse_args()
    images = photos(args.requests + WARMUP_REQUESTS)
    print(f"{args.requests} requests at concurrency {args.concurrency}, 640x480 JPEG photos", flush=True)
    if args.url:
        check_loopback(args.url)
        report("given server", asyncio.run(load(args.url, args.requests, args.concurrency, images)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from vlm_inspect.models.families.llava import save_tiny_model

            model = save_tiny_model(Path(tmp) / "tiny-llava", seed=0)
        for max_batch in (int(v) for v in args.max_batch.split(",")):
            for record in args.record.split(","):
                station = Path(tmp) / f"station-{max_batch}" if record == "on" else None
                with server(model, max_batch, station) as url:
                    result = asyncio.run(load(url, args.requests, args.concurrency, images))
                report(f"max_batch {max_batch} record {record}", result)
                if station:
                    report_store(station, args.requests + WARMUP_REQUESTS)


def report_store(station: Path, inspections: int) -> None:
    """Bytes the station holds per 1,000 inspections: database (WAL checkpointed into it) and photo files."""
    with sqlite3.connect(station / "station.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db = sum(p.stat().st_size for p in station.glob("station.db*"))
    photo_files = sum(p.stat().st_size for p in (station / "photos").rglob("*") if p.is_file())
    per = 1000 / inspections
    print(
        f"{'':<24} stored per 1,000 inspections: database {db * per / 1024:,.0f} KiB, "
        f"photos {photo_files * per / 1024**2:,.1f} MiB (mean photo {photo_files / inspections / 1024:,.0f} KiB)",
        flush=True,
    )


if __name__ == "__main__":
    main()

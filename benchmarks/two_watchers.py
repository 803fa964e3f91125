"""Before/after of issue #28's two-watcher item: two `watch` processes on one hot folder; how often the model ran.

Each trial writes --photos photos into a fresh hot folder, starts two watcher processes on it (the real `Watcher`,
one station store, `--sort result-file`) around a stand-in model that takes --model-s per photo and counts its
calls, and prints the model calls of each process, the records in the store and the result files written.
Run it on two checkouts and compare.

Run: PYTHONPATH=src python benchmarks/two_watchers.py [--photos 20] [--trials 5] [--model-s 0.05]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

from PIL import Image

from vlm_inspect.config import WatchConfig
from vlm_inspect.data.reference import NO_REFERENCE
from vlm_inspect.station.history import HistoryFilter, all_records
from vlm_inspect.station.store import open_store
from vlm_inspect.watch import Watcher


class StandIn:
    """The predictor interface: p(NG) is the photo's darkness; each photo scored takes `seconds`."""

    name = "stand-in"
    product = "product"

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def reference_for(self, reference=None):
        return NO_REFERENCE if reference is None else reference

    def score(self, images, question=None, batch_size=8, reference=None):
        self.calls += len(images)
        time.sleep(self.seconds * len(images))
        return [1.0 - sum(im.convert("L").getdata()) / (255.0 * im.width * im.height) for im in images]

    def describe(self, images, question=None, max_new_tokens=64, batch_size=8, reference=None):
        return [""] * len(images)


def _photo(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 72), (shade, shade, shade)).save(buffer, "PNG")
    return buffer.getvalue()


def _watch(folder: str, station: str, seconds: float, calls, slot: int) -> None:
    model = StandIn(seconds)
    cfg = WatchConfig(folder=folder, model="stand-in", station=station, poll_s=0.05, max_polls=8, sort="result-file")
    try:
        Watcher(open_store(station), model, cfg, "hash0").run()
    finally:
        calls[slot] = model.calls


def trial(photos: int, seconds: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix="two-watchers-"))
    folder, station = root / "hot", root / "station"
    folder.mkdir()
    for i in range(photos):
        (folder / f"cam-{i:02d}.png").write_bytes(_photo(20 + (i * 11) % 220))
    open_store(station).close()
    ctx = multiprocessing.get_context("fork")
    calls = ctx.Array("i", 2)
    workers = [ctx.Process(target=_watch, args=(str(folder), str(station), seconds, calls, i)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
    records = all_records(open_store(station), HistoryFilter())
    return {
        "model_calls": list(calls),
        "total_calls": sum(calls),
        "photos_scored_twice": sum(calls) - len(records),
        "records": len(records),
        "distinct_files": len({r["file"] for r in records}),
        "result_files": len(list(folder.glob("*.result.json"))),
        "exit_codes": [w.exitcode for w in workers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--model-s", type=float, default=0.05)
    args = parser.parse_args()
    for n in range(args.trials):
        print(json.dumps({"trial": n, "photos": args.photos, **trial(args.photos, args.model_s)}), flush=True)


if __name__ == "__main__":
    main()

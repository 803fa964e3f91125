"""Before/after figures for issue #19's service and resume items; run it on two checkouts and compare.

serve: a real uvicorn on 127.0.0.1 around a stand-in model that takes --model-s per call.
  - abandoned: 20 clients post a chat request and hang up; then one honest client asks. Prints the
    honest client's latency and how many model calls ran.
  - drip: --drip connections send an upload one byte per second. Prints how many are still open
    after --drip-s seconds.
resume: the tiny model trains with save_total_limit=1 and is killed (SIGKILL) right after the
  Trainer wrote checkpoint 2 and rotated, before the checkpoint was marked complete; then
  `train --resume` runs. Prints what the resume did: the step it resumed from, or its refusal.

Run: PYTHONPATH=src python benchmarks/hardening.py serve|resume [--model-s 0.5] [--drip 20] [--drip-s 40]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image


class StandIn:
    """The predictor interface, each model call taking a fixed time."""

    name, has_adapter, default_question = "stand-in", False, "OK or NG?"

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def _work(self) -> None:
        self.calls += 1
        time.sleep(self.seconds)

    @property
    def reference(self):
        from vlm_inspect.data.reference import NO_REFERENCE

        return NO_REFERENCE

    def reference_for(self, reference=None):
        return self.reference if reference is None else reference

    def prompt(self, question, history=None, reference=None):
        return question

    def score(self, images, question=None, batch_size=8, reference=None):
        self._work()
        return [0.5] * len(images)

    def describe(self, images, question=None, max_new_tokens=64, batch_size=8):
        self._work()
        return ["a box"] * len(images)

    def generate(self, images, prompts, max_new_tokens=64, temperature=0.0, reference=None):
        self._work()
        return ["OK."] * len(images)

    def read_answer(self, text, image, reference=None):
        from vlm_inspect.inference import Answer

        return Answer(text, [], 0)

    def stream(self, image, prompt, max_new_tokens=64, temperature=0.0, reference=None):
        self._work()
        yield "OK."


def _photo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 200, 200)).save(buf, "PNG")
    return buf.getvalue()


def _chat_request(port: int) -> bytes:
    url = "data:image/png;base64," + base64.b64encode(_photo()).decode()
    content = [{"type": "text", "text": "OK or NG?"}, {"type": "image_url", "image_url": {"url": url}}]
    body = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def _start(predictor: StandIn) -> tuple[object, int]:
    import uvicorn

    from vlm_inspect.config import ServeConfig
    from vlm_inspect.service.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(predictor, ServeConfig(model="unused", port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, port


def serve_figures(model_s: float, drip: int, drip_s: float) -> None:
    predictor = StandIn(model_s)
    server, port = _start(predictor)
    request = _chat_request(port)
    leavers = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for s in leavers:
        s.sendall(request)
    time.sleep(0.5)  # all 20 queued (the first one running)
    for s in leavers:
        s.close()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as honest:
        honest.sendall(request)
        answer = honest.recv(65536)
    latency = time.perf_counter() - started
    print(f"abandoned: honest client behind 20 hung-up chat requests (model {model_s} s per call):")
    print(f"  status {answer.split(b' ')[1].decode()}, latency {latency:.2f} s, model calls {predictor.calls}")

    head, body = _inspect_upload(port)
    drips = [socket.create_connection(("127.0.0.1", port)) for _ in range(drip)]
    for s in drips:
        s.sendall(head)
    deadline = time.monotonic() + drip_s
    sent = 0
    while time.monotonic() < deadline:
        for s in drips:
            with contextlib.suppress(OSError):  # the server hung up on it
                s.sendall(body[sent : sent + 1])
        sent += 1
        time.sleep(1.0)
    still_open = sum(_open(s) for s in drips)
    print(f"drip: {still_open} of {drip} slow-drip uploads still open after {drip_s:.0f} s")
    server.should_exit = True


def _inspect_upload(port: int) -> tuple[bytes, bytes]:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        + _photo()
        + b"\r\n--b--\r\n"
    )
    head = (
        f"POST /v1/inspect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def _open(s: socket.socket) -> bool:
    """Whether the server still holds the connection (reading shows EOF or a reset once it closed)."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False


_KILL_AFTER_ROTATION = r"""
import os, signal, sys
from transformers import Trainer
from vlm_inspect.cli import app
real = Trainer._save_checkpoint
def save_then_die(self, model, trial):
    real(self, model, trial)  # writes checkpoint-N and (on old code) rotates the older one away
    if self.state.global_step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer._save_checkpoint = save_then_die
sys.argv = ["vlm-inspect", *sys.argv[1:]]
app()
"""


def _resume(tmp: Path) -> None:
    from vlm_inspect.models.families.llava import save_tiny_model

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import write_spot_dataset

    model, data, run = tmp / "model", tmp / "data", tmp / "run"
    save_tiny_model(model)
    write_spot_dataset(data)
    args = ["train", "--model", str(model), "--data", str(data), "--out", str(run)]
    args += ["min_steps=4", "save_fraction=0.25", "save_total_limit=1", "lora_r=4", "lora_alpha=8", "--no-augment"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_ROTATION, *args], env=env, capture_output=True)
    complete = sorted(p.parent.name for p in run.glob("checkpoints/*/checkpoint-complete"))
    print(f"resume: killed (exit {killed.returncode}) after checkpoint-2 was written; complete checkpoints: {complete}")
    before = _metric_rows(run)
    resumed = subprocess.run(
        [sys.executable, "-m", "vlm_inspect.cli", *args, "--resume"], env=env, capture_output=True, text=True
    )
    after = _metric_rows(run)
    rerun = [step for step, row in after.items() if before.get(step) != row]
    output = " ".join((resumed.stdout + resumed.stderr).split())
    said = next((s for s in ("starting from the beginning", "no complete checkpoint") if s in output), "")
    print(f"  --resume exit {resumed.returncode}; steps trained by the resume: {rerun} of {sorted(after)}; {said}")


def _metric_rows(run: Path) -> dict[int, str]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {json.loads(line)["step"]: line for line in lines if line.strip() and "loss" in line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["serve", "resume"])
    parser.add_argument("--model-s", type=float, default=0.5)
    parser.add_argument("--drip", type=int, default=20)
    parser.add_argument("--drip-s", type=float, default=40.0)
    args = parser.parse_args()
    if args.what == "serve":
        serve_figures(args.model_s, args.drip, args.drip_s)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _resume(Path(tmp))


if __name__ == "__main__":
    main()

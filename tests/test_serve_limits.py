"""`vlm-inspect serve` under hostile or careless clients: every request bounded, abandoned work dropped.

Uses the fake predictor of test_serve.py; the hang-up and slow-drip cases need a real uvicorn (in a
thread, on 127.0.0.1), since a TestClient cannot hang up.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from test_serve import FakePredictor, _free_port, _wait_until, assert_error, chat_body, make_client, photo_bytes  # noqa: E402
from vlm_inspect.cli import app as cli_app  # noqa: E402
from vlm_inspect.config import ServeConfig  # noqa: E402
from vlm_inspect.errors import ConfigError  # noqa: E402
from vlm_inspect.service.app import create_app  # noqa: E402
from vlm_inspect.service.limits import resolve_api_key  # noqa: E402


@contextmanager
def live_server(predictor: FakePredictor, **settings) -> Iterator[tuple[object, int]]:
    """The app under a real uvicorn in a thread; yields (app, port)."""
    port = _free_port()
    app = create_app(predictor, ServeConfig(model="unused", port=port, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_until(lambda: server.started)
    try:
        yield app, port
    finally:
        server.should_exit = True
        thread.join(10)


def multipart(port: int, photo: bytes) -> tuple[bytes, bytes]:
    """(head, body) of a POST /v1/inspect upload."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + photo + b"\r\n--b--\r\n"
    )
    head = (
        f"POST /v1/inspect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def _pending_done(app) -> int:
    return sum(job.future.done() for job in app.state.batcher._pending)


def test_a_32000_character_prompt_is_refused_before_the_model():
    predictor = FakePredictor()
    with make_client(predictor) as client:
        refused = client.post("/v1/chat/completions", json=chat_body(text="x" * 32_000))
        assert_error(refused, 413, "max_prompt_chars")
        assert client.post("/v1/chat/completions", json=chat_body(text="x" * 3_000)).status_code == 200
    assert len(predictor.prompts) == 1


def test_work_of_clients_that_hung_up_never_reaches_the_model():
    gate = threading.Event()
    predictor = FakePredictor(gate=gate)
    with live_server(predictor) as (app, port):
        head, body = multipart(port, photo_bytes())
        first = socket.create_connection(("127.0.0.1", port))
        first.sendall(head + body)
        assert predictor.started.wait(5)  # the first request holds the model
        leavers = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head + body)
            leavers.append(s)
        _wait_until(lambda: app.state.batcher.waiting == 20)
        for s in leavers:
            s.close()
        _wait_until(lambda: _pending_done(app) == 20)  # all 20 cancelled while still queued
        honest = socket.create_connection(("127.0.0.1", port))
        honest.sendall(head + body)
        gate.set()
        answer = honest.recv(65536)
        first.close()
        honest.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert sum(predictor.batches) == 2  # the first request and the honest one; none of the 20


def test_a_slow_drip_upload_gets_408_and_is_disconnected():
    with live_server(FakePredictor(), body_timeout_s=0.5) as (_app, port):
        head, body = multipart(port, photo_bytes())
        drip = socket.create_connection(("127.0.0.1", port))
        drip.settimeout(10)
        drip.sendall(head + body[:10])
        answer = b""
        for byte in body[10:200]:
            try:
                drip.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.02)
        while chunk := drip.recv(65536):  # the server closes the connection after its answer
            answer += chunk
        drip.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in answer


def test_a_client_hanging_up_mid_upload_logs_one_line(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    with live_server(FakePredictor()) as (_app, port):
        head, body = multipart(port, photo_bytes())
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head + body[: len(body) // 2])
        time.sleep(0.2)
        s.close()
        _wait_until(lambda: any("client left" in r.getMessage() for r in caplog.records))
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


@pytest.mark.parametrize(
    ("host", "status"),
    [("127.0.0.1:8000", 200), ("localhost:8000", 200), ("[::1]:8000", 200), ("evil.example:8000", 421)],
)
def test_loopback_server_answers_only_loopback_host_names(host: str, status: int):
    with make_client() as client:
        response = client.get("/v1/models", headers={"Host": host})
    assert response.status_code == status
    if status != 200:
        assert_error(response, status, "DNS rebinding")


def test_a_server_bound_to_all_addresses_accepts_any_host():
    with make_client(host="0.0.0.0", api_key="k") as client:
        response = client.get("/v1/models", headers={"Host": "inspect.line3.example", "Authorization": "Bearer k"})
    assert response.status_code == 200


def test_every_api_response_says_nosniff():
    with make_client() as client:
        for response in (
            client.get("/healthz"),
            client.get("/v1/models"),
            client.get("/nowhere"),
            client.post("/v1/inspect", files={"file": ("a.png", photo_bytes())}),
            client.post("/v1/inspect", content=b"x", headers={"Content-Type": "text/plain"}),
        ):
            assert response.headers["x-content-type-options"] == "nosniff"


def test_api_key_from_file_or_environment(tmp_path: Path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key(None, str(key_file), {"VLM_INSPECT_API_KEY": "from-env"}) == "from-file"
    assert resolve_api_key(None, None, {"VLM_INSPECT_API_KEY": "from-env"}) == "from-env"
    assert resolve_api_key(None, None, {}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_api_key(None, str(tmp_path / "empty"), {})
    help_text = " ".join(CliRunner().invoke(cli_app, ["serve", "--help"], terminal_width=200).output.split())
    assert "--api-key-file" in help_text and "ps" in help_text and "VLM_INSPECT_API_KEY" in help_text

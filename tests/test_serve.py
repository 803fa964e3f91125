"""`vlm-inspect serve`: every route and error code over a fake model, then the real server end to end.

The fake predictor scores a photo by its darkness, so verdicts are known in advance, and records
every batch it is given, so batching can be seen. The integration tests run the tiny model in a real
uvicorn process on 127.0.0.1, driven by the official `openai` client, httpx and headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402
from helpers import llava_prompt as render_prompt  # noqa: E402
from vlm_inspect.config import ModelSettings, ServeConfig  # noqa: E402
from vlm_inspect.data.reference import NO_REFERENCE  # noqa: E402
from vlm_inspect.errors import ConfigError  # noqa: E402
from vlm_inspect.inference import Answer  # noqa: E402
from vlm_inspect.serve import check_serve_config
from vlm_inspect.service.app import create_app  # noqa: E402

KEY = "s3cret-key"


class FakePredictor:
    """Stands in for `Predictor`: p(NG) is the photo's darkness; generation echoes the prompt."""

    name = "fake-model"
    has_adapter = False
    default_question = "Is this product OK or NG?"
    product = "product"

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None, reference=NO_REFERENCE):
        self.delay_s = delay_s
        self.gate = gate  # when given, every model call waits for it
        self.started = threading.Event()
        self.batches: list[int] = []
        self.prompts: list[str] = []
        self.threads: set[str] = set()
        self.reference = reference
        self.judged: list = []  # the references each score batch was judged against, as given

    def reference_for(self, reference=None):
        return self.reference if reference is None else reference

    def _enter(self) -> None:
        self.threads.add(threading.current_thread().name)
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay_s)

    def score(self, images, question=None, batch_size=8, reference=None):
        self._enter()
        self.batches.append(len(images))
        self.judged.append(reference)
        return [1.0 - sum(img.convert("L").getdata()) / (255.0 * img.width * img.height) for img in images]

    def describe(self, images, question=None, max_new_tokens=64, batch_size=8, reference=None):
        self._enter()
        return [f"a {img.width}x{img.height} photo" for img in images]

    def answers(self, images, question=None, max_new_tokens=64, batch_size=8, reference=None):
        return [self.read_answer(text, None) for text in self.describe(images, question, max_new_tokens, batch_size)]

    def locate(self, images, max_new_tokens=64, batch_size=8, reference=None):
        self._enter()
        return [Answer("", [], 0) for _ in images]

    def read_answer(self, text, image, reference=None):
        return Answer(text, [], 0)

    def prompt(self, question, history=None, reference=None):
        return render_prompt(question, history)

    def generate(self, images, prompts, max_new_tokens=64, temperature=0.0, reference=None):
        self._enter()
        self.prompts.extend(prompts)
        return [f"NG. seen {len(p)} prompt chars" for p in prompts]

    def stream(self, image, prompt, max_new_tokens=64, temperature=0.0, reference=None) -> Iterator[str]:
        self._enter()
        self.prompts.append(prompt)
        yield from ["NG.", " A dark", " spot."]


def photo_bytes(shade: int = 230, size: tuple[int, int] = (48, 32), fmt: str = "PNG") -> bytes:
    """A light (OK) or dark (NG) box photo, encoded."""
    image = Image.new("RGB", size, (shade, shade, shade))
    ImageDraw.Draw(image).rectangle([4, 4, 12, 12], fill=(shade // 2, shade // 2, shade // 2))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat_body(text: str = "Is it OK?", image: bytes | None = None, **extra) -> dict:
    content = [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": data_uri(image or photo_bytes())}},
    ]
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


def make_client(predictor=None, **settings) -> TestClient:
    cfg = ServeConfig(model="unused", **settings)
    app = create_app(predictor or FakePredictor(), cfg)
    return TestClient(app, raise_server_exceptions=False, base_url=f"http://127.0.0.1:{cfg.port}")


def assert_error(response, status: int, words: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type"}
    assert words.lower() in error["message"].lower()
    assert "Traceback" not in response.text
    return error


# ---------------------------------------------------------------- /v1/inspect


def test_inspect_multipart_gives_verdict_score_and_model():
    with make_client() as client:
        light = client.post("/v1/inspect", files={"file": ("a.png", photo_bytes(230), "image/png")})
        dark = client.post("/v1/inspect", files={"file": ("b.jpg", photo_bytes(20, fmt="JPEG"), "image/jpeg")})
    assert light.status_code == 200, light.text
    body = light.json()
    assert set(body) == {"verdict", "p_ng", "threshold", "reference", "model", "latency_ms"}
    assert body["reference"] is None  # the model has no references, and the request named none
    assert body["verdict"] == "OK" and body["p_ng"] < 0.5 and body["threshold"] == 0.5
    assert body["model"] == "fake-model" and body["latency_ms"] >= 0
    assert dark.json()["verdict"] == "NG" and dark.json()["p_ng"] > 0.5


def test_inspect_json_base64_with_describe_and_threshold():
    with make_client() as client:
        image = base64.b64encode(photo_bytes(230)).decode()
        r = client.post("/v1/inspect", json={"image": image, "describe": True, "threshold": 0.01})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["verdict"] == "NG" and body["threshold"] == 0.01  # a strict threshold turns the light photo NG
    assert body["description"] == "a 48x32 photo"


def test_inspect_describe_as_form_or_query_field():
    with make_client() as client:
        as_form = client.post("/v1/inspect", files={"file": ("a.png", photo_bytes())}, data={"describe": "true"})
        as_query = client.post("/v1/inspect?describe=1", files={"file": ("a.png", photo_bytes())})
        without = client.post("/v1/inspect", files={"file": ("a.png", photo_bytes())})
    assert as_form.json()["description"] == as_query.json()["description"] == "a 48x32 photo"
    assert "description" not in without.json()


def test_inspect_uses_configured_threshold():
    with make_client(threshold=0.0) as client:
        r = client.post("/v1/inspect", files={"file": ("a.png", photo_bytes(250))})
    assert r.json()["threshold"] == 0.0 and r.json()["verdict"] == "NG"


def test_inspect_refuses_what_is_not_an_image_415():
    with make_client() as client:
        text = client.post("/v1/inspect", files={"file": ("photo.png", b"just some text, named like a png")})
        truncated = client.post("/v1/inspect", files={"file": ("cut.png", photo_bytes()[:60])})
        wrong_type = client.post("/v1/inspect", content=photo_bytes(), headers={"content-type": "image/png"})
        b64_text = client.post("/v1/inspect", json={"image": base64.b64encode(b"<html></html>").decode()})
    assert_error(text, 415, "not an image")
    assert_error(truncated, 415)
    assert_error(wrong_type, 415, "multipart/form-data")
    assert_error(b64_text, 415)


def test_inspect_refuses_decompression_bomb_415(monkeypatch):
    import vlm_inspect.service.app as app_module

    monkeypatch.setattr(app_module, "MAX_IMAGE_PIXELS", 1000)
    with make_client() as client:
        r = client.post("/v1/inspect", files={"file": ("big.png", photo_bytes(size=(100, 100)))})
    assert_error(r, 415, "pixels")


def test_inspect_refuses_oversized_upload_413():
    big = photo_bytes(size=(300, 300), fmt="BMP")  # ~270 KB, over a 0.1 MB limit
    with make_client(max_upload_mb=0.1) as client:
        multipart = client.post("/v1/inspect", files={"file": ("big.bmp", big)})
        as_json = client.post("/v1/inspect", json={"image": base64.b64encode(big[:120_000]).decode()})

        def chunks():  # no Content-Length: the limit is enforced while the body is read (here 3 MB)
            for _ in range(48):
                yield b"x" * 65536

        chunked = client.post("/v1/inspect", content=chunks(), headers={"content-type": "application/json"})
        declared = client.post("/v1/inspect", content=b"x" * 3_000_000, headers={"content-type": "application/json"})
    assert_error(multipart, 413)
    assert_error(as_json, 413, "upload limit")
    assert_error(chunked, 413, "body is over the upload limit")
    assert_error(declared, 413, "3,000,000 bytes")


def test_inspect_bad_requests_400_and_422():
    with make_client() as client:
        no_file = client.post("/v1/inspect", files={"other": ("a.png", photo_bytes())})
        bad_json = client.post("/v1/inspect", content=b"{not json", headers={"content-type": "application/json"})
        bad_b64 = client.post("/v1/inspect", json={"image": "%%%not-base64%%%"})
        missing = client.post("/v1/inspect", json={"picture": "abc"})
        bad_threshold = client.post("/v1/inspect", json={"image": "aGk=", "threshold": 2})
        bad_flag = client.post("/v1/inspect?describe=maybe", files={"file": ("a.png", photo_bytes())})
    assert_error(no_file, 400, "'file'")
    assert_error(bad_json, 400, "not valid JSON")
    assert_error(bad_b64, 400, "base64")
    assert_error(missing, 422, "image")
    assert_error(bad_threshold, 422, "threshold")
    assert_error(bad_flag, 422, "describe")


# ---------------------------------------------------------------- /v1/chat/completions


def test_chat_completion_openai_shape_and_prompt():
    predictor = FakePredictor()
    with make_client(predictor) as client:
        r = client.post("/v1/chat/completions", json=chat_body("Is the box OK?"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "fake-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": body["choices"][0]["message"]["content"]}
    assert body["choices"][0]["message"]["content"].startswith("NG.")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert predictor.prompts == ["USER: <image>\nIs the box OK? ASSISTANT:"]


def test_chat_multi_turn_system_ignored_and_image_only_uses_default_question():
    predictor = FakePredictor()
    messages = [
        {"role": "system", "content": "You are an inspector."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(photo_bytes())}}]},
        {"role": "assistant", "content": "NG."},
        {"role": "user", "content": "Where is the defect?"},
    ]
    with make_client(predictor) as client:
        r = client.post("/v1/chat/completions", json={"model": "x", "messages": messages})
    assert r.status_code == 200, r.text
    assert predictor.prompts == [
        "USER: <image>\nIs this product OK or NG? ASSISTANT: NG.</s>USER: Where is the defect? ASSISTANT:"
    ]


def test_chat_streaming_sends_sse_chunks_and_done():
    with make_client() as client, client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "NG. A dark spot."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_refuses_remote_urls_and_paths_400():
    predictor = FakePredictor()
    with make_client(predictor) as client:
        answers = []
        for url in ("http://example.com/a.png", "https://example.com/a.png", "file:///etc/passwd", "/etc/passwd"):
            body = chat_body()
            body["messages"][0]["content"][1]["image_url"]["url"] = url
            answers.append(client.post("/v1/chat/completions", json=body))
    for r in answers:
        assert_error(r, 400, "never fetches or opens")
    assert predictor.prompts == []


def test_chat_bad_requests_400_422_415():
    six_images = chat_body()  # two are fine (a known-good reference, then the photo); six are more than 4 + 1
    six_images["messages"][0]["content"] += [six_images["messages"][0]["content"][1]] * 5
    ends_with_assistant = chat_body()
    ends_with_assistant["messages"].append({"role": "assistant", "content": "OK."})
    with make_client() as client:
        no_image = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        six = client.post("/v1/chat/completions", json=six_images)
        order = client.post("/v1/chat/completions", json=ends_with_assistant)
        no_messages = client.post("/v1/chat/completions", json={"model": "x", "messages": []})
        bad_role = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
        n2 = client.post("/v1/chat/completions", json=chat_body(n=2))
        not_image = client.post("/v1/chat/completions", json=chat_body(image=b"GIF89a-but-not-really"))
    assert_error(no_image, 400, "send one image")
    assert_error(six, 400, "got 6")
    assert_error(order, 400, "end with a user message")
    assert_error(no_messages, 422, "messages")
    assert_error(bad_role, 422, "role")
    assert_error(n2, 422, "n")
    assert_error(not_image, 415)


# ---------------------------------------------------------------- other routes, auth, errors


def test_models_healthz_and_page():
    with make_client() as client:
        models = client.get("/v1/models").json()
        health = client.get("/healthz").json()
        page = client.get("/")
        script = client.get("/static/app.js")
        missing = client.get("/static/../app.py")
    assert models["data"][0]["id"] == "fake-model" and models["object"] == "list"
    assert health == {"status": "ok", "waiting": 0, "batches": 0, "images_scored": 0}
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="files"' in page.text and "/static/app.js" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert script.status_code == 200 and "/v1/inspect" in script.text
    assert_error(missing, 404)


def test_page_is_self_contained():
    from vlm_inspect.service.http import STATIC

    for name in ("index.html", "app.js", "app.css"):
        text = (STATIC / name).read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text, f"{name} loads something from outside"
    script = (STATIC / "app.js").read_text(encoding="utf-8")
    assert "外观检测" in script and "Export CSV" in script  # both languages


def test_api_key_required_on_every_api_route_401():
    with make_client(api_key=KEY) as client:
        calls = [
            ("get", "/v1/models", {}),
            ("get", "/v1/reference", {}),
            ("post", "/v1/inspect", {"files": {"file": ("a.png", photo_bytes())}}),
            ("post", "/v1/chat/completions", {"json": chat_body()}),
        ]
        for method, path, kwargs in calls:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": KEY},
                {"Authorization": "Basic " + KEY},
            ):
                r = getattr(client, method)(path, headers=headers, **kwargs)
                assert_error(r, 401, "API key")
                assert r.headers["www-authenticate"] == "Bearer"
            ok = getattr(client, method)(path, headers={"Authorization": f"Bearer {KEY}"}, **kwargs)
            assert ok.status_code == 200, (path, ok.text)
        assert client.get("/healthz").status_code == 200  # probes need no key
        assert client.get("/").status_code == 200  # the page asks for the key itself


def test_unknown_route_and_method_are_json_errors():
    with make_client() as client:
        assert_error(client.get("/v1/nothing"), 404)
        assert_error(client.get("/v1/inspect"), 405)


def test_unexpected_error_is_500_without_details():
    class Broken(FakePredictor):
        def score(self, images, question=None, batch_size=8, reference=None):
            raise RuntimeError("secret internal path /srv/models/x")

    with make_client(Broken()) as client:
        r = client.post("/v1/inspect", files={"file": ("a.png", photo_bytes())})
    error = assert_error(r, 500, "internal error")
    assert "secret" not in r.text and error["type"] == "server_error"


# ---------------------------------------------------------------- batching, queue, timeouts


def test_concurrent_requests_are_batched():
    predictor = FakePredictor(delay_s=0.3)
    with make_client(predictor, max_batch=4) as client, ThreadPoolExecutor(9) as pool:
        post = lambda _: client.post("/v1/inspect", files={"file": ("a.png", photo_bytes())})  # noqa: E731
        answers = list(pool.map(post, range(9)))
        stats = client.app.state.batcher.stats
        health = client.get("/healthz").json()
    assert [r.status_code for r in answers] == [200] * 9
    assert sum(predictor.batches) == 9
    assert max(predictor.batches) > 1, predictor.batches
    assert max(predictor.batches) <= 4
    assert stats.images == 9 and stats.largest_batch == max(predictor.batches)
    assert health["batches"] == len(predictor.batches) < 9 and health["images_scored"] == 9


def test_model_runs_on_one_thread_for_scores_and_generation():
    predictor = FakePredictor(delay_s=0.05)
    with make_client(predictor) as client, ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(client.post, "/v1/inspect?describe=true", files={"file": ("a.png", photo_bytes())})]
        jobs += [pool.submit(client.post, "/v1/chat/completions", json=chat_body()) for _ in range(3)]
        assert all(job.result().status_code == 200 for job in jobs)
    assert len(predictor.threads) == 1


def test_queue_full_is_503_with_retry_after():
    gate = threading.Event()
    predictor = FakePredictor(gate=gate)
    with make_client(predictor, max_queue=1) as client, ThreadPoolExecutor(2) as pool:
        post = lambda: client.post("/v1/inspect", files={"file": ("a.png", photo_bytes())})  # noqa: E731
        try:
            running = pool.submit(post)
            assert predictor.started.wait(5)  # the first request holds the model
            waiting = pool.submit(post)
            _wait_until(lambda: client.app.state.batcher.waiting == 1)
            refused = post()
            refused_chat = client.post("/v1/chat/completions", json=chat_body())
        finally:
            gate.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert_error(refused, 503, "busy")
    assert refused.headers["retry-after"] == "1"
    assert_error(refused_chat, 503)


def test_slow_model_is_504():
    gate = threading.Event()
    with make_client(FakePredictor(gate=gate), request_timeout_s=0.2) as client:
        try:
            slow = client.post("/v1/inspect", files={"file": ("a.png", photo_bytes())})
            slow_chat = client.post("/v1/chat/completions", json=chat_body())
            slow_stream = client.post("/v1/chat/completions", json=chat_body(stream=True))
        finally:
            gate.set()
    assert_error(slow, 504, "timeout")
    assert_error(slow_chat, 504)
    assert_error(slow_stream, 504)


def _wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# ---------------------------------------------------------------- settings


def test_bad_settings_are_listed_together():
    cfg = ServeConfig(model="", port=0, threshold=1.5, max_batch=0, max_upload_mb=0, api_key=" ")
    with pytest.raises(ConfigError) as caught:
        check_serve_config(cfg)
    problems = "\n".join(caught.value.problems)
    for name in ("model", "port", "threshold", "max_batch", "max_upload_mb", "api_key"):
        assert name in problems


def test_busy_port_is_a_clear_error():
    from vlm_inspect.service.http import bind as _bind

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
            _bind("127.0.0.1", taken.getsockname()[1])


def test_serve_warms_the_model_up_before_it_listens(monkeypatch, tmp_path: Path):
    """The first requests must not pay the GPU's compile time inside their time limit."""
    from vlm_inspect import serve as serve_module
    from vlm_inspect.inference import Predictor
    from vlm_inspect.service import http as http_module

    events = []

    class FakePredictor:
        name, device, product = "fake", None, "product"

        def warm_up(self, max_batch: int, max_new_tokens: int) -> None:
            events.append(("warm_up", max_batch, max_new_tokens))

    class FakeServer:
        def __init__(self, config: object):
            pass

        def run(self, sockets: list) -> None:
            events.append(("run", len(sockets)))

    fake = FakePredictor()
    fake.device = type("Device", (), {"type": "cpu"})()
    monkeypatch.setattr(Predictor, "load", classmethod(lambda cls, *args, **kwargs: fake))
    monkeypatch.setattr(http_module.uvicorn, "Server", FakeServer)
    serve_module.serve(ServeConfig(model=str(tmp_path), port=_free_port(), max_batch=4, max_new_tokens=16))
    assert events == [("warm_up", 4, 16), ("run", 1)]


# ---------------------------------------------------------------- a real server on the tiny model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> Iterator[str]:
    """`vlm-inspect serve` on the tiny model in its own process, on 127.0.0.1 with an API key."""
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "vlm_inspect.cli", "serve", "--model", str(tiny_model_dir)]
    command += ["--port", str(port), "--api-key", KEY, "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{process.stdout.read()}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not answer /healthz within 120 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.integration
def test_real_server_with_official_openai_client(served: str):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny-llava"]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Is this box OK or NG?"},
                {"type": "image_url", "image_url": {"url": data_uri(photo_bytes(60))}},
            ],
        }
    ]
    answer = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=8, temperature=0)
    text = answer.choices[0].message.content
    assert isinstance(text, str) and text and answer.model == "tiny-llava"
    stream = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=8, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 2 and "".join(pieces).strip() == text  # greedy: the same answer either way

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served + "/v1", api_key="wrong", max_retries=0).models.list()
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="never fetches"):
        client.chat.completions.create(model="tiny-llava", messages=remote)


@pytest.mark.integration
def test_real_server_inspect_matches_predictor(served: str, tiny_model_dir: Path):
    import httpx

    from vlm_inspect.data.images import load_image
    from vlm_inspect.inference import Predictor

    photos = [photo_bytes(shade) for shade in (20, 90, 160, 230)]
    expected = Predictor.load(ModelSettings(model=tiny_model_dir, device="cpu")).score([load_image(p) for p in photos])
    headers = {"Authorization": f"Bearer {KEY}"}

    def inspect(photo: bytes) -> dict:
        r = httpx.post(served + "/v1/inspect", files={"file": ("p.png", photo)}, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(4) as pool:  # concurrent, so the server batches them
        answers = list(pool.map(inspect, photos))
    for answer, p in zip(answers, expected, strict=True):
        assert answer["p_ng"] == pytest.approx(p, abs=1e-4)
        assert answer["verdict"] == ("NG" if p >= 0.5 else "OK") and answer["model"] == "tiny-llava"
    as_json = httpx.post(
        served + "/v1/inspect",
        json={"image": base64.b64encode(photos[0]).decode(), "describe": True},
        headers=headers,
        timeout=60,
    ).json()
    assert as_json["p_ng"] == pytest.approx(expected[0], abs=1e-4) and isinstance(as_json["description"], str)
    refused = httpx.post(served + "/v1/inspect", files={"file": ("p.png", b"not a photo")}, headers=headers)
    assert_error(refused, 415)


@pytest.mark.integration
def test_operator_page_in_headless_chromium(served: str, tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    photos = []
    for i, shade in enumerate((40, 220)):
        path = tmp_path / f"box-{i}.jpg"
        path.write_bytes(photo_bytes(shade, size=(320, 240), fmt="JPEG"))
        photos.append(path)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860}, accept_downloads=True)
            page.goto(served + "/")
            page.fill("#api-key", KEY)
            page.check("#describe")
            page.set_input_files("#files", [str(p) for p in photos])
            # A locator, not wait_for_function: the page's CSP forbids the eval that would need.
            sync_api.expect(page.locator(".card.ok, .card.ng")).to_have_count(2, timeout=60_000)
            badges = sorted(page.locator(".card .badge").all_inner_texts())
            assert all(b in ("OK", "NG") for b in badges) and len(badges) == 2
            assert page.inner_text("#n-total") == "2" and page.inner_text("#n-err") == "0"
            assert int(page.inner_text("#n-ok")) + int(page.inner_text("#n-ng")) == 2
            assert all(page.locator(".card .desc").all_inner_texts())  # the describe toggle was honoured
            page.screenshot(path=str(tmp_path / "operator-page.png"), full_page=True)
            with page.expect_download() as download:
                page.click("#export")
            csv_text = Path(download.value.path()).read_text(encoding="utf-8-sig")
            assert csv_text.splitlines()[0].startswith("file,verdict,p_ng,threshold")
            assert {line.split(",")[0] for line in csv_text.splitlines()[1:]} == {"box-0.jpg", "box-1.jpg"}
            page.click("#lang")
            assert page.inner_text("h1 span") == "外观检测"
            assert page.inner_text("#export") == "导出 CSV"
        finally:
            browser.close()

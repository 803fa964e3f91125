"""References in the service (#26): `/v1/inspect` judges against the model's references unless told `none` or sent
known-good photos, and says which; chat takes the images before the last as references; the batcher never mixes
photos judged against different references; `/v1/reference` shows them; the operator page shows what each verdict
was judged against (headless Chromium on the tiny model served with a reference)."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")

from conftest import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402
from test_serve import KEY, FakePredictor, _free_port, assert_error, chat_body, data_uri, make_client, photo_bytes  # noqa: E402
from vlm_inspect.data.reference import NO_REFERENCE, Reference  # noqa: E402
from vlm_inspect.service.batcher import Batcher  # noqa: E402

GOLDEN = Reference.from_bytes("run", [("ref_01.png", photo_bytes(230))])


def test_inspect_uses_the_models_references_and_says_so():
    fake = FakePredictor(reference=GOLDEN)
    with make_client(fake) as client:
        answer = client.post("/v1/inspect", files={"file": ("a.png", photo_bytes())}).json()
        alone = client.post("/v1/inspect", files={"file": ("a.png", photo_bytes())}, data={"reference": "none"}).json()
        as_json = client.post(
            "/v1/inspect", json={"image": base64.b64encode(photo_bytes()).decode(), "reference": "none"}
        )
    assert answer["reference"] == GOLDEN.record() and fake.judged[0] is None  # None: the model's own
    assert alone["reference"] is None and fake.judged[1] is NO_REFERENCE
    assert as_json.json()["reference"] is None


def test_inspect_against_known_good_photos_sent_with_it():
    fake = FakePredictor(reference=GOLDEN)
    golden = photo_bytes(240)
    with make_client(fake) as client:
        sent = client.post(
            "/v1/inspect",
            files=[("file", ("a.png", photo_bytes())), ("reference", ("golden.png", golden))],
            data={"describe": "true"},
        ).json()
        listed = client.post(
            "/v1/inspect", json={"image": base64.b64encode(photo_bytes()).decode(), "reference": [data_uri(golden)]}
        ).json()
        broken = client.post("/v1/inspect", files=[("file", ("a.png", photo_bytes())), ("reference", ("r.png", b"x"))])
        word = client.post("/v1/inspect", files={"file": ("a.png", photo_bytes())}, data={"reference": "golden"})
    assert sent["reference"]["name"] == "upload" and sent["reference"]["photos"][0]["file"] == "golden.png"
    assert fake.judged[0].sha256 == Reference.from_bytes("x", [("g", golden)]).sha256
    assert listed["reference"]["photos"][0]["sha256"] == sent["reference"]["photos"][0]["sha256"]
    assert_error(broken, 415, "reference")
    assert_error(word, 422, "reference")


def test_chat_takes_the_images_before_the_last_as_references():
    fake = FakePredictor(reference=GOLDEN)
    body = chat_body("The first image is a normal sample. Is there any anomaly in the second image?")
    content = body["messages"][0]["content"]
    content.insert(1, {"type": "image_url", "image_url": {"url": data_uri(photo_bytes(240))}})
    with make_client(fake) as client:
        two = client.post("/v1/chat/completions", json=body).json()
        one = client.post("/v1/chat/completions", json=chat_body()).json()
    assert two["reference"]["name"] == "upload" and two["reference"]["photos"][0]["file"] == "image 1"
    assert one["reference"] == GOLDEN.record()


def test_the_batcher_batches_only_photos_judged_against_the_same_references():
    fake = FakePredictor()
    image = Image.new("RGB", (8, 8))

    async def run() -> None:
        batcher = Batcher(fake, max_batch=8, max_queue=16, timeout_s=10)
        await asyncio.gather(*(batcher.score(image, ref) for ref in (GOLDEN, None, GOLDEN, None, NO_REFERENCE)))
        await batcher.close()

    asyncio.run(run())
    assert fake.batches == [2, 2, 1] and fake.judged == [GOLDEN, None, NO_REFERENCE]


def test_the_models_references_are_shown_to_the_page():
    with make_client(FakePredictor(reference=GOLDEN), api_key=KEY) as client:
        assert_error(client.get("/v1/reference"), 401)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/v1/reference", headers=auth).json() == {"reference": GOLDEN.record()}
        photo = client.get("/v1/reference/0", headers=auth)
        assert photo.headers["content-type"] == "image/jpeg" and photo.content[:2] == b"\xff\xd8"
        assert_error(client.get("/v1/reference/1", headers=auth), 404, "1 reference photo")
    with make_client(FakePredictor()) as client:
        assert client.get("/v1/reference").json() == {"reference": None}


@pytest.mark.integration
def test_the_operator_page_says_what_each_verdict_was_judged_against(tiny_model_dir: Path, tmp_path: Path):
    import httpx

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    golden = tmp_path / "golden.png"
    golden.write_bytes(photo_bytes(235, size=(320, 240)))
    port = _free_port()
    command = [sys.executable, "-m", "vlm_inspect.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port)]
    command += ["--device", "cpu", "--reference", str(golden)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        photos = [tmp_path / "box-dark.jpg", tmp_path / "box-light.jpg"]
        for path, shade in zip(photos, (40, 220), strict=True):
            path.write_bytes(photo_bytes(shade, size=(320, 240), fmt="JPEG"))
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/")
            sync_api.expect(page.locator("#reference-photos img")).to_have_count(1, timeout=30_000)
            assert page.inner_text("#reference-name") == "golden.png: golden.png"
            page.set_input_files("#files", [str(photos[0])])
            sync_api.expect(page.locator(".card.ok, .card.ng")).to_have_count(1, timeout=60_000)
            page.uncheck("#use-reference")
            page.set_input_files("#files", [str(photos[1])])
            sync_api.expect(page.locator(".card.ok, .card.ng")).to_have_count(2, timeout=60_000)
            metas = page.locator(".card .meta").all_inner_texts()  # newest first
            assert "judged alone" in metas[0] and "vs golden.png: golden.png" in metas[1]
            page.screenshot(path=str(tmp_path / "operator-page-reference.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(15)

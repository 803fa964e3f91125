"""Defect boxes in each family's answer frame: a box written for training and read back from an answer lands where
it was, for every family, photo shape and image budget, computed from the resize the model's input really takes."""

from __future__ import annotations

import itertools
import math

import pytest
from PIL import Image

from vlm_inspect.data.images import model_input_size, square_image
from vlm_inspect.models.boxes import JSON_BOXES, MAX_BOXES, REF_BOXES, make_view, read_boxes, write_boxes
from vlm_inspect.models.families import all_families, family_named
from vlm_inspect.models.load import load_processor

FAMILIES = [f.name for f in all_families()]
# square, 4:3, 16:9, 1:4 strip, and a 5 MP frame (shrunk to 2,048 px a side first)
PHOTOS = [(640, 640), (640, 480), (1920, 1080), (400, 1600), (2448, 2048)]
BUDGETS = [64, 256, 1280]


@pytest.fixture(scope="module")
def processors(tiny_model) -> dict:
    return {name: load_processor(tiny_model(name)) for name in FAMILIES}


def boxes_on(width: int, height: int) -> list[list[float]]:
    """A few boxes: a small one near the top left, a wide one, one touching the bottom right corner."""
    return [
        [0.05 * width, 0.08 * height, 0.12 * width, 0.15 * height],
        [0.3 * width, 0.45 * height, 0.8 * width, 0.55 * height],
        [0.9 * width, 0.93 * height, float(width), float(height)],
    ]


@pytest.mark.parametrize(("name", "photo", "budget"), list(itertools.product(FAMILIES, PHOTOS, BUDGETS)))
def test_a_box_round_trips_within_one_encoder_pixel(processors: dict, name: str, photo: tuple, budget: int):
    family, processor = family_named(name), processors[name]
    family.set_resolution(processor, budget)
    model_input = model_input_size(*photo)
    view = family.view(processor, photo, model_input)
    seen_width, seen_height = family.seen(processor, *model_input)
    tolerance = (photo[0] / seen_width, photo[1] / seen_height)  # one encoder pixel, in photo pixels
    truth = boxes_on(*photo)
    text = write_boxes(family.box_text, view, [(f"defect {i}", box) for i, box in enumerate(truth)])
    prose, found, dropped = read_boxes(family.box_text, view, f"NG. A scratch and a spot. {text}")
    assert dropped == 0 and prose == "NG. A scratch and a spot."
    assert [d["type"] for d in found] == ["defect 0", "defect 1", "defect 2"]
    for want, got in zip(truth, found, strict=True):
        errors = [abs(a - b) for a, b in zip(want, got["box"], strict=True)]
        assert max(errors[0::2]) <= tolerance[0] and max(errors[1::2]) <= tolerance[1], (want, got, tolerance)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("photo", [(640, 480), (400, 1600)])
def test_the_frame_is_the_input_the_processor_really_gets(processors: dict, name: str, photo: tuple):
    """The canvas is what `square_image` hands the processor; Qwen2.5-VL's frame is the grid the processor makes."""
    family, processor = family_named(name), processors[name]
    family.set_resolution(processor, 256)
    view = family.view(processor, photo, model_input_size(*photo))
    canvas = square_image(
        Image.new("RGB", photo), processor.image_processor.image_mean, "pad" if family.square_pad else "native"
    )
    assert canvas.size == tuple(int(v) for v in view.canvas)
    if family.box_frame == "resized":
        grid = processor.image_processor(images=[canvas], return_tensors="pt")["image_grid_thw"][0]
        patch = processor.image_processor.patch_size
        assert (grid[2] * patch, grid[1] * patch) == view.frame
    else:
        assert view.frame == (1000.0, 1000.0)


def test_the_families_write_their_own_conventions(processors: dict):
    photo = (1000, 500)
    box = [[100.0, 50.0, 300.0, 250.0]]
    qwen25 = family_named("qwen2_5_vl")
    qwen25.set_resolution(processors["qwen2_5_vl"], 1280)
    view = qwen25.view(processors["qwen2_5_vl"], photo, photo)
    assert view.frame[0] % 28 == 0 and view.frame[0] != 1000  # absolute pixels of the resized image
    assert write_boxes(qwen25.box_text, view, [("spot", box[0])]).startswith('[{"bbox_2d": [')
    for name in ("qwen3_vl", "internvl"):
        view = family_named(name).view(processors[name], photo, photo)
        assert view.to_frame(box[0]) == [100, 100, 300, 500]  # thousandths of the image
    assert write_boxes(REF_BOXES, view, [("spot", box[0])]) == "<ref>spot</ref><box>[[100, 100, 300, 500]]</box>"
    llava = family_named("llava")
    view = llava.view(processors["llava"], photo, photo)  # padded to a 1000 × 1000 square: 250 px above
    assert view.to_frame(box[0]) == [100, 300, 300, 500]
    assert write_boxes(JSON_BOXES, view, []) == "[]" == write_boxes(REF_BOXES, view, [])


BAD_ANSWERS = {
    "unparseable": ('NG. [{"bbox_2d": [1, 2, three, 4], "label": "x"}]', 0, 1),
    "inverted": ('NG. [{"bbox_2d": [500, 500, 100, 100], "label": "x"}]', 0, 1),
    "non-finite": ('NG. [{"bbox_2d": [1, 2, 1e999, 4], "label": "x"}]', 0, 1),
    "NaN": ('NG. [{"bbox_2d": [NaN, 2, 3, 4], "label": "x"}]', 0, 1),
    "outside the photo": ('NG. [{"bbox_2d": [2000, 2000, 3000, 3000], "label": "x"}]', 0, 1),
    "half outside": ('NG. [{"bbox_2d": [900, 900, 3000, 3000], "label": "x"}]', 1, 0),
    "three numbers": ('NG. [{"bbox_2d": [1, 2, 3], "label": "x"}]', 0, 1),
    "not a list": ('NG. [{"bbox_2d": "here", "label": "x"}]', 0, 1),
    "cut off": ('NG. [{"bbox_2d": [10, 20, 30', 0, 0),
    "hundreds": ("NG. " + ", ".join('{"bbox_2d": [10, 10, 20, 20], "label": "x"}' for _ in range(300)), MAX_BOXES, 280),
    "deep nesting": ("NG. " + "[" * 5000 + "]" * 5000, 0, 0),
    "no boxes": ("OK. The box has no visible defects.", 0, 0),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_a_box_written_badly_is_dropped_and_counted_never_raised_or_left_unclamped(case: str):
    answer, kept, dropped = BAD_ANSWERS[case]
    view = make_view((1000, 1000), (1000, 1000), None, None)  # thousandths of a 1000 px photo: 1 unit = 1 px
    prose, found, lost = read_boxes(JSON_BOXES, view, answer)
    assert (len(found), lost) == (kept, dropped)
    for defect in found:
        x0, y0, x1, y1 = defect["box"]
        assert 0 <= x0 < x1 <= 1000 and 0 <= y0 < y1 <= 1000 and all(math.isfinite(v) for v in defect["box"])
    assert prose.startswith(("NG", "OK"))


def test_internvl_boxes_of_one_label_and_bad_ones():
    view = make_view((1000, 1000), (1000, 1000), None, None)
    answer = "NG. <ref>scratch</ref><box>[[10, 10, 50, 50], [60, 60, 20, 20], [70, 70, 90, 90]]</box> done"
    prose, found, dropped = read_boxes(REF_BOXES, view, answer)
    assert prose == "NG. done" and dropped == 1
    assert [d["box"] for d in found] == [[10.0, 10.0, 50.0, 50.0], [70.0, 70.0, 90.0, 90.0]]


# ---------------------------------------------------------------- training answers


def boxed_dataset(folder, size=(96, 72), box=(60, 10, 80, 26)):
    """Two photos: an NG one with a dark square at `box` (and its box), an OK one; prepare's sample layout."""
    import json

    from PIL import ImageDraw

    (folder / "images").mkdir(parents=True)
    ng, ok = Image.new("RGB", size, (230, 230, 226)), Image.new("RGB", size, (230, 230, 226))
    ImageDraw.Draw(ng).rectangle(box, fill=(10, 10, 10))
    ng.save(folder / "images" / "ng.png")
    ok.save(folder / "images" / "ok.png")
    question = {"from": "human", "value": "<image>\nIs this box OK or NG?"}
    samples = [
        {
            "id": "ng",
            "image": "images/ng.png",
            "label": "NG",
            "defects": [{"type": "black_spot", "box": list(box)}],
            "conversations": [question, {"from": "gpt", "value": "NG. There is a black spot near the top right."}],
        },
        {
            "id": "ok",
            "image": "images/ok.png",
            "label": "OK",
            "conversations": [question, {"from": "gpt", "value": "OK."}],
        },
    ]
    (folder / "train.json").write_text(json.dumps(samples))
    (folder / "manifest.json").write_text(json.dumps({"language": "en", "product": "box"}))
    return folder


@pytest.mark.parametrize("name", FAMILIES)
def test_training_answers_carry_each_box_in_the_family_frame_and_locate_items(tiny_model, tmp_path, name: str):
    from vlm_inspect.data.dataset import IGNORE_INDEX, load_training_dataset

    family = family_named(name)
    processor = load_processor(tiny_model(name), 64)
    data = boxed_dataset(tmp_path / "data")
    dataset = load_training_dataset(data, processor, family, max_length=2048)
    # the two samples, then one item per sample asking for the boxes alone, as a first question
    assert dataset.items == [(0, False), (1, False), (0, True), (1, True)]
    answers = []
    for item in range(4):
        row = dataset[item]
        supervised = [
            i
            for i, label in zip(row["input_ids"].tolist(), row["labels"].tolist(), strict=True)
            if label != IGNORE_INDEX
        ]
        answers.append(processor.tokenizer.decode(supervised, skip_special_tokens=True).strip())
    view = family.view(processor, (96, 72), (96, 72))
    assert answers[0].startswith("NG. There is a black spot near the top right.") and answers[1].startswith("OK.")
    seen_width = family.seen(processor, 96, 72)[0]
    for answer in (answers[0], answers[2]):  # after the verdict and description, and alone
        _, found, dropped = read_boxes(family.box_text, view, answer)
        assert dropped == 0 and [d["type"] for d in found] == ["black spot"]
        assert max(abs(a - b) for a, b in zip(found[0]["box"], (60, 10, 80, 26), strict=True)) <= 96 / seen_width
    assert (
        answers[2].startswith(("[", "<ref>"))
        and answers[3] == "[]"
        and read_boxes(family.box_text, view, answers[3])[1] == []
    )
    assert dataset.conversations[2].text.count(dataset.locate_questions[0]) == 1


def test_no_locate_turn_when_no_photo_of_the_dataset_is_boxed(tiny_model_dir, spot_dataset):
    from vlm_inspect.data.dataset import load_training_dataset

    dataset = load_training_dataset(spot_dataset, load_processor(tiny_model_dir), family_named("llava"), max_length=512)
    assert dataset.locate_questions == () and len(dataset) == 16 and all(not locate for _, locate in dataset.items)


@pytest.mark.parametrize("seed", range(12))
def test_augmentation_moves_the_box_with_the_defect_and_keeps_it_in_view(seed: int):
    import random

    import numpy as np
    from PIL import ImageDraw

    from vlm_inspect.data.dataset import augment_image

    image = Image.new("RGB", (160, 120), (220, 220, 220))
    box = [110.0, 12.0, 140.0, 34.0]
    ImageDraw.Draw(image).rectangle([110, 12, 139, 33], fill=(0, 0, 0))
    moved_image, (moved,) = augment_image(image, [box], random.Random(f"{seed}"))
    dark = np.asarray(moved_image.convert("L")) < 60
    ys, xs = np.nonzero(dark)
    shown = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    width, height = moved_image.size
    assert 0 <= moved[0] < moved[2] <= width and 0 <= moved[1] < moved[3] <= height
    # the box covers the defect as augmented (a turned box grows a little around its corners)
    assert (
        moved[0] <= shown[0] + 1 and moved[1] <= shown[1] + 1 and moved[2] >= shown[2] - 1 and moved[3] >= shown[3] - 1
    )
    assert (moved[2] - moved[0]) <= 1.25 * (shown[2] - shown[0]) + 2 and (moved[3] - moved[1]) <= 1.25 * (
        shown[3] - shown[1]
    ) + 2


# ---------------------------------------------------------------- boxes out of the verbs


BOXED_ANSWER = (
    'NG. A spot. [{"bbox_2d": [100, 300, 300, 450], "label": "spot"}, {"bbox_2d": [5, 5, 1, 1], "label": "x"}]'
)
# the tiny LLaVA pads a 200 × 100 photo onto a 200 px square (50 px above): thousandths 100..300 × 300..450 of the
# square are photo pixels 20..60 × 10..40


@pytest.fixture
def boxed_answers(monkeypatch):
    from vlm_inspect.inference import Predictor

    monkeypatch.setattr(Predictor, "describe", lambda self, images, *a, **k: [BOXED_ANSWER] * len(images))


def test_predict_rows_carry_defects_in_the_photos_pixels(tiny_model_dir, tmp_path, boxed_answers):
    import csv
    import json

    from typer.testing import CliRunner

    from vlm_inspect.cli import app

    Image.new("RGB", (200, 100), "white").save(tmp_path / "a.png")
    for out, flag in (("p.jsonl", "--describe"), ("p.csv", "--locate")):
        args = ["predict", str(tmp_path / "a.png"), "--model", str(tiny_model_dir), "--out", str(tmp_path / out), flag]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert row["description"] == "NG. A spot." and row["boxes_dropped"] == 1
    assert row["defects"] == [{"type": "spot", "box": [20.0, 10.0, 60.0, 40.0]}]
    with (tmp_path / "p.csv").open() as f:
        cell = next(csv.DictReader(f))
    assert json.loads(cell["defects"]) == row["defects"] and "description" in cell and cell["description"] == ""


def test_serve_answers_defects_on_inspect_and_beside_the_chat_text(tiny_model_dir, boxed_answers, monkeypatch):
    import base64
    import io

    from fastapi.testclient import TestClient

    from vlm_inspect.config import ModelSettings, ServeConfig
    from vlm_inspect.inference import Predictor
    from vlm_inspect.service.app import create_app

    monkeypatch.setattr(Predictor, "generate", lambda self, images, prompts, *a, **k: [BOXED_ANSWER] * len(images))
    predictor = Predictor.load(ModelSettings(model=str(tiny_model_dir), device="cpu"))
    buf = io.BytesIO()
    Image.new("RGB", (200, 100), "white").save(buf, format="PNG")
    app = create_app(predictor, ServeConfig(model=str(tiny_model_dir)))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        plain = client.post("/v1/inspect", files={"file": ("a.png", buf.getvalue())}).json()
        located = client.post("/v1/inspect", files={"file": ("a.png", buf.getvalue())}, data={"locate": "true"}).json()
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        message = {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Any defect?"}],
        }
        chat = client.post("/v1/chat/completions", json={"messages": [message]}).json()
    assert "defects" not in plain  # scoring alone stays one forward pass
    assert located["defects"] == [{"type": "spot", "box": [20.0, 10.0, 60.0, 40.0]}] and located["boxes_dropped"] == 1
    assert chat["choices"][0]["message"]["content"] == BOXED_ANSWER and chat["defects"] == located["defects"]

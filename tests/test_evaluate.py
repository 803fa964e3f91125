"""`evaluate`: settings checks, data loading, and the whole run on the tiny model (base vs adapter)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from helpers import make_run
from vlm_inspect import evaluate as ev
from vlm_inspect.config import EvaluateConfig, ModelSettings
from vlm_inspect.errors import ConfigError, DataError, OutputExistsError
from vlm_inspect.evaluation.localization import NO_BOXED_NG, SWITCHED_OFF
from vlm_inspect.evaluation.report import write_report


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, spot_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder like train's, made without training, with metrics.jsonl (a summary row and a torn last line)."""
    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 11)] + [{"train_runtime": 1.0}]
    metrics = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo'
    return make_run(tmp_path_factory.mktemp("runs") / "run", tiny_model_dir, spot_dataset, metrics=metrics)


def cfg_for(**values) -> EvaluateConfig:
    return EvaluateConfig(**values)


# ---------------------------------------------------------------- settings


def test_merged_model_without_base_explains_that_before_needs_base(tmp_path: Path, spot_dataset: Path):
    with pytest.raises(ConfigError) as err:
        ev.validate(cfg_for(model=str(tmp_path), data=str(spot_dataset), out=str(tmp_path / "r")))
    assert "--base" in str(err.value) and "'before'" in str(err.value)


def test_every_bad_setting_is_listed_at_once(tmp_path: Path):
    cfg = cfg_for(
        model="m", adapter="a", base="b", data=str(tmp_path / "none"), out="", max_escape=1.5, threshold=-0.1,
        batch_size=0, gallery_size=-1, questions=str(tmp_path / "q.txt"),
    )  # fmt: skip
    with pytest.raises(ConfigError) as err:
        ev.validate(cfg)
    text = str(err.value)
    for word in ("out: required", "adapter and base", "max_escape", "threshold", "batch_size", "gallery_size",
                 "data:", "questions:"):  # fmt: skip
        assert word in text
    assert len(err.value.problems) == 8


def test_existing_report_folder_is_refused_without_overwrite(tmp_path: Path, spot_dataset: Path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "config.yaml").write_text("kind: EvaluateConfig\n")
    cfg = cfg_for(model="m", adapter="a", data=str(spot_dataset), out=str(out))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        ev.validate(cfg)
    ev.validate(cfg_for(model="m", adapter="a", data=str(spot_dataset), out=str(out), overwrite=True))


# ---------------------------------------------------------------- data and questions


def test_items_from_dataset_val_json(spot_dataset: Path):
    items, skipped = ev.load_items(spot_dataset)
    assert skipped == []
    assert [i.label for i in items] == ["OK", "NG", "OK", "NG"]
    assert items[1].path == spot_dataset / "images" / "001.png"
    assert items[1].description == "A black spot."
    assert items[0].description is None


def test_label_falls_back_to_the_verdict_word_and_unlabelled_samples_are_named(tmp_path: Path, spot_dataset: Path):
    samples = json.loads((spot_dataset / "val.json").read_text())
    for s in samples:
        del s["label"]
    samples[0]["conversations"][1]["value"] = "Looks fine."
    path = tmp_path / "val.json"
    shutil.copytree(spot_dataset / "images", tmp_path / "images")  # a link out of the folder would be refused
    path.write_text(json.dumps(samples[1:]))
    assert [i.label for i in ev.load_items(path)[0]] == ["NG", "OK", "NG"]
    path.write_text(json.dumps(samples))
    with pytest.raises(DataError, match=r"sample 0 \(s0\)"):
        ev.load_items(path)


def test_items_from_class_folders_keep_defects_and_skipped_files(tmp_path: Path):
    from PIL import Image

    (tmp_path / "ok").mkdir()
    (tmp_path / "ng" / "spot").mkdir(parents=True)
    for n in range(2):
        Image.new("RGB", (40, 30), (250 - n, 250, 250)).save(tmp_path / "ok" / f"ok{n}.png")
    Image.new("RGB", (40, 30), (20, 20, 20)).save(tmp_path / "ng" / "spot" / "s0.png")
    (tmp_path / "ng" / "spot" / "s0.json").write_text(json.dumps({"defects": [{"type": "spot", "box": [1, 2, 9, 9]}]}))
    (tmp_path / "ok" / "broken.png").write_bytes(b"not an image")
    items, skipped = ev.load_items(tmp_path)
    assert sorted((i.shown_path, i.label) for i in items) == [
        ("ng/spot/s0.png", "NG"),
        ("ok/ok0.png", "OK"),
        ("ok/ok1.png", "OK"),
    ]
    ng = next(i for i in items if i.label == "NG")
    assert ng.defect_type == "spot" and ng.defects[0]["box"] == [1, 2, 9, 9]
    assert [s["path"] for s in skipped] == ["ok/broken.png"]


def test_unreadable_photos_are_skipped_with_their_reason(tmp_path: Path):
    from PIL import Image

    Image.new("RGB", (40, 30), "white").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    items = [
        ev.Item("a", tmp_path / "ok.png", "ok.png", "OK"),
        ev.Item("b", tmp_path / "broken.png", "broken.png", "NG", defects=[{"type": "spot", "box": [1, 1, 5, 5]}]),
    ]
    good, skipped, thumbs = ev.check_images(items)
    assert [i.id for i in good] == ["a"]
    assert skipped[0]["path"] == "broken.png" and skipped[0]["reason"]
    assert thumbs["a"].startswith("data:image/jpeg;base64,")
    with pytest.raises(DataError, match="none of the 1 photos"):
        ev.check_images(items[1:])


def test_thumbnail_is_the_plain_photo_scaled(tmp_path: Path):
    """The report draws true and predicted boxes over the thumbnail itself, so none is burnt into it."""
    import base64
    import io

    from PIL import Image

    photo = Image.new("RGB", (512, 384), "white")
    photo.paste((20, 20, 20), (100, 100, 300, 300))
    thumb = Image.open(io.BytesIO(base64.b64decode(ev.thumbnail_uri(photo).split(",", 1)[1]))).convert("RGB")
    assert thumb.size == (256, 192)
    assert min(thumb.getpixel((100, 100))) < 60 and min(thumb.getpixel((20, 20))) > 200


def test_questions_are_training_then_heldout_then_file(tmp_path: Path, spot_dataset: Path):
    qfile = tmp_path / "q.txt"
    qfile.write_text("# mine\nIs the box damaged?\n\nIs the box damaged?\n")
    questions = ev.build_questions(cfg_for(data=str(spot_dataset), questions=str(qfile)))
    kinds = [q.kind for q in questions]
    assert kinds[0] == "training" and questions[0].default and not any(q.default for q in questions[1:])
    assert kinds.index("heldout") > kinds.index("training") and kinds[-1] == "extra"
    assert [q.text for q in questions].count("Is the box damaged?") == 1
    assert all("{product}" not in q.text for q in questions)
    assert "box" in questions[0].text  # the manifest's product word
    assert len({q.id for q in questions}) == len(questions)


def test_choose_gallery_puts_mistakes_first_then_alternates(spot_dataset: Path):
    items = [ev.Item(f"i{n}", Path("x"), "x", label) for n, label in enumerate(["OK", "OK", "OK", "NG", "NG"])]
    p_ng = [0.1, 0.9, 0.2, 0.8, 0.3]  # i1 overkill, i4 escape
    assert ev.choose_gallery(items, p_ng, 0.5, 10) == ["i1", "i4", "i3", "i0", "i2"]
    assert ev.choose_gallery(items, p_ng, 0.5, 3) == ["i1", "i4", "i3"]


def test_training_rows_skip_summary_and_partial_lines(tmp_path: Path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"summary": 1}\n{"step": 2, "loss": 1.5}\n{"st')
    for adapter in (run, run / "adapter"):
        rows = ev.training_rows(str(adapter))["rows"]
        assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert ev.training_rows(None) == {"metrics_file": None, "rows": []}


# ---------------------------------------------------------------- end to end on the tiny model


@pytest.fixture
def short_dataset(tmp_path: Path) -> Path:
    """The spot dataset whose manifest records only 2 training and 1 held-out wording (keeps the run short)."""
    from conftest import write_spot_dataset

    data = write_spot_dataset(tmp_path / "data")
    prompts = {"verdict_questions": ["Is this box OK or NG?", "OK or NG?"], "heldout_questions": ["Any defect?"]}
    (data / "manifest.json").write_text(json.dumps({"language": "en", "product": "box", "prompts": prompts}))
    return data


def test_questions_recorded_in_the_manifest_are_the_ones_asked(short_dataset: Path):
    questions = ev.build_questions(cfg_for(data=str(short_dataset)))
    assert [(q.text, q.kind) for q in questions] == [
        ("Is this box OK or NG?", "training"),
        ("OK or NG?", "training"),
        ("Any defect?", "heldout"),
    ]


def test_evaluate_end_to_end_on_tiny_model(tiny_model_dir: Path, lora_run: Path, short_dataset: Path, tmp_path: Path):
    spot_dataset = short_dataset
    out = tmp_path / "report"
    qfile = tmp_path / "q.txt"
    qfile.write_text("Is the box damaged?\n")
    cfg = cfg_for(
        model=str(tiny_model_dir), adapter=str(lora_run), data=str(spot_dataset), out=str(out),
        questions=str(qfile), batch_size=3, max_new_tokens=6, gallery_size=3, device="cpu",
    )  # fmt: skip
    assert ev.evaluate(cfg) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "report.html", "results.json"]
    assert not list(tmp_path.glob(".report.*"))  # the temporary sibling is gone

    results = json.loads((out / "results.json").read_text())
    assert results["version"] == 2
    # The spot dataset has no defect boxes: nothing to compare boxes with, and no model was asked for any.
    assert results["localization"]["reason"] == NO_BOXED_NG and results["localization"]["models"] == {}
    assert all(img["located"] is None and img["size"] == [80, 64] for img in results["images"])
    assert results["data"]["n_images"] == 4 and results["data"]["n_ng"] == 2
    assert results["models"]["base"]["adapter"] is None and results["models"]["tuned"]["adapter"] == str(lora_run)
    qids = [q["id"] for q in results["questions"]]
    assert {q["kind"] for q in results["questions"]} == {"training", "heldout", "extra"}
    for m in ("base", "tuned"):
        assert set(results["metrics"][m]) == set(qids)
    shown = [img for img in results["images"] if img["answers"]]
    assert len(shown) == 3
    for img in results["images"]:
        for m in ("base", "tuned"):
            assert set(img["p_ng"][m]) == set(qids)
            assert all(0.0 <= p <= 1.0 for p in img["p_ng"][m].values())
    assert all(img["thumbnail"].startswith("data:image/jpeg") for img in shown)
    # The adapter changes the scores: base and tuned really are different models.
    base = [img["p_ng"]["base"]["q0"] for img in results["images"]]
    tuned = [img["p_ng"]["tuned"]["q0"] for img in results["images"]]
    assert max(abs(a - b) for a, b in zip(base, tuned, strict=True)) > 1e-4
    assert [r["step"] for r in results["training"]["rows"]] == list(range(1, 11))

    html = (out / "report.html").read_text()
    assert "http" not in html.lower()
    assert len(re.findall(r'class="card gallery-item"', html)) == 3

    # The report is rebuilt from results.json alone, identically.
    rebuilt = write_report(out / "results.json", tmp_path / "again.html")
    assert rebuilt.read_text() == html

    # Running again into the same folder is refused; with overwrite it is replaced.
    with pytest.raises(OutputExistsError):
        ev.evaluate(cfg)


def test_base_scores_match_a_plain_base_predictor(tiny_model_dir: Path, lora_run: Path, spot_dataset: Path):
    """The 'before' column is the base model itself: the adapter switched off gives its exact scores."""
    from vlm_inspect.data.images import load_image
    from vlm_inspect.inference import Predictor

    images = [load_image(i.path) for i in ev.load_items(spot_dataset)[0]]
    plain = Predictor.load(ModelSettings(model=tiny_model_dir, device="cpu")).score(images, "Is it OK?")
    tuned = Predictor.load(ModelSettings(model=tiny_model_dir, adapter=lora_run, device="cpu"))
    with tuned.adapter_disabled():
        switched_off = tuned.score(images, "Is it OK?")
    assert switched_off == pytest.approx(plain, abs=1e-5)


def test_evaluate_merged_model_loads_base_separately(tiny_model_dir: Path, short_dataset: Path, tmp_path: Path):
    out = tmp_path / "merged-report"
    cfg = cfg_for(model=str(tiny_model_dir), base=str(tiny_model_dir), data=str(short_dataset), out=str(out),
                  max_new_tokens=4, gallery_size=2, device="cpu", locate=False)  # fmt: skip
    ev.evaluate(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["localization"]["reason"] == SWITCHED_OFF
    assert "--base" in results["models"]["base"]["how"] and "merged" in results["models"]["tuned"]["how"]
    # Here the "merged" folder is the base itself, so both columns must agree exactly.
    for img in results["images"]:
        assert img["p_ng"]["base"] == pytest.approx(img["p_ng"]["tuned"], abs=1e-6)
    assert results["training"]["rows"] == []


# ---------------------------------------------------------------- localization, with known boxes


TRUTH = {"s1": [17, 16, 37, 36], "s3": [31, 16, 51, 36]}  # the spots the spot dataset draws (80 × 64 photos)
PLAN = {  # what each model "answers" to the locate question, per photo
    "tuned": {"s0": [], "s1": [[17, 16, 37, 36]], "s2": [], "s3": [[39, 16, 59, 36]]},
    "base": {"s0": [[1, 1, 11, 11]], "s1": [], "s2": [[1, 1, 11, 11], [60, 40, 70, 50]], "s3": [[0, 0, 80, 64]]},
    "compare": {"s0": [], "s1": [], "s2": [], "s3": []},
}


@pytest.fixture
def boxed_dataset(short_dataset: Path) -> Path:
    """The short spot dataset whose two NG photos in val.json carry their spot's box, of two defect types."""
    samples = json.loads((short_dataset / "val.json").read_text())
    for sample, kind in zip(samples[1::2], ("spot", "dent"), strict=True):
        sample["defect_type"] = kind
        sample["defects"] = [{"type": kind, "box": TRUTH[sample["id"]]}]
    (short_dataset / "val.json").write_text(json.dumps(samples))
    return short_dataset


def test_evaluate_measures_localization_of_every_model(
    tiny_model_dir: Path, lora_run: Path, boxed_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):  # fmt: skip
    """`Predictor.locate` answers known boxes; results.json's measures are those boxes' worked by hand, for the
    tuned model, the base (the same weights, adapter off) and a --compare model."""
    import hashlib

    from vlm_inspect.data.images import load_image
    from vlm_inspect.evaluation.metrics import wilson_interval
    from vlm_inspect.inference import Answer, Predictor
    from vlm_inspect.models.fast_paths import adapter_active

    photo_id = {hashlib.sha256(load_image(i.path).tobytes()).hexdigest(): i.id for i in ev.load_items(boxed_dataset)[0]}
    asked: dict[str, list[str]] = {}

    def locate(self, images, max_new_tokens=128, batch_size=8):
        who = "compare" if not self.has_adapter else "tuned" if adapter_active(self.model) else "base"
        ids = [photo_id[hashlib.sha256(image.tobytes()).hexdigest()] for image in images]
        asked.setdefault(who, []).extend(ids)
        dropped = {("base", "s1"): 2}
        return [Answer("", [{"type": "spot", "box": b} for b in PLAN[who][i]], dropped.get((who, i), 0)) for i in ids]

    monkeypatch.setattr(Predictor, "locate", locate)
    out = tmp_path / "report"
    cfg = cfg_for(model=str(tiny_model_dir), adapter=str(lora_run), data=str(boxed_dataset), out=str(out),
                  compare=[str(tiny_model_dir)], max_new_tokens=4, gallery_size=4, device="cpu")  # fmt: skip
    ev.evaluate(cfg)
    results = json.loads((out / "results.json").read_text())
    block = results["localization"]
    # Each model was asked once per NG photo with a box and once per OK photo.
    assert {who: sorted(ids) for who, ids in asked.items()} == {w: ["s0", "s1", "s2", "s3"] for w in PLAN}
    assert block["reason"] is None and (block["n_ng"], block["n_true_boxes"], block["n_ok"]) == (2, 2, 2)
    assert (
        block["questions"]["tuned"]
        == block["questions"]["base"]
        == "Locate each defect on this box with a bounding box."
    )
    assert block["questions"]["compare-1"] == "Locate each defect on this product with a bounding box."
    assert list(block["models"]) == ["tuned", "base", "compare-1"]

    def share(k: int, n: int) -> dict:
        low, high = wilson_interval(k, n)
        return {"value": k / n, "low": low, "high": high, "k": k, "n": n, "reason": None}

    tuned, base, compare = (block["models"][k] for k in ("tuned", "base", "compare-1"))
    # tuned: s1 exact (IoU 1); s3 moved 8 px right: 12 × 20 overlap, 560 px covered, IoU 3/7, centre still inside
    assert tuned["acc_iou"] == {"0.5": share(1, 2), "0.3": share(2, 2)}
    assert tuned["mean_iou"]["value"] == pytest.approx((1 + 3 / 7) / 2)
    assert tuned["pointing"] == share(2, 2) and tuned["ok_photos_with_boxes"] == share(0, 2)
    assert tuned["false_alarms_per_ok_photo"] == {"value": 0.0, "boxes": 0, "photos": 2, "reason": None}
    # base: nothing on s1; the whole photo on s3 (IoU 400 / 5120, its centre on the spot); 3 boxes on 2 OK photos
    assert base["acc_iou"] == {"0.5": share(0, 2), "0.3": share(0, 2)}
    assert base["mean_iou"]["value"] == pytest.approx(400 / 5120 / 2)
    assert base["pointing"] == share(1, 2) and base["ng_photos_with_boxes"] == share(1, 2)
    assert base["false_alarms_per_ok_photo"] == {"value": 1.5, "boxes": 3, "photos": 2, "reason": None}
    assert base["ok_photos_with_boxes"] == share(2, 2) and base["boxes_dropped"] == 2
    assert compare["pointing"] == share(0, 2) and compare["name"] == tiny_model_dir.name
    assert [(t["type"], t["acc_iou"]["0.5"]["k"]) for t in tuned["per_type"]] == [("dent", 0), ("spot", 1)]

    images = {img["id"]: img for img in results["images"]}
    assert images["s3"]["located"]["tuned"]["defects"] == [{"type": "spot", "box": [39, 16, 59, 36]}]
    assert images["s3"]["located"]["tuned"]["iou"] == pytest.approx(3 / 7, abs=1e-6)
    assert images["s2"]["located"]["base"] == {"defects": [{"type": "spot", "box": b} for b in PLAN["base"]["s2"]],
                                               "dropped": 0}  # fmt: skip
    assert all(img["size"] == [80, 64] for img in images.values())

    shown = " ".join(capsys.readouterr().out.split())
    assert "ACC@IoU 0.5 (boxes)" in shown and "false boxes / OK photo" in shown and "1.50 (3/2)" in shown
    html = (out / "report.html").read_text()
    assert html.count('data-box="truth"') == 2  # one true box on each NG photo of the gallery
    assert html.count('data-box="base"') == 1 + 2 + 1 and html.count('data-box="tuned"') == 2
    assert 'id="localization-table"' in html and 'data-key="compare-1"' in html


def test_the_locate_question_is_the_runs(tiny_model_dir: Path, lora_run: Path):
    from vlm_inspect.inference import Predictor

    tuned = Predictor.load(ModelSettings(model=tiny_model_dir, adapter=lora_run, device="cpu"))
    assert tuned.locate_question == "Locate each defect on this box with a bounding box."  # the run's product word

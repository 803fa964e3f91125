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


def test_thumbnail_draws_defect_boxes_scaled(tmp_path: Path):
    import base64
    import io

    from PIL import Image

    photo = Image.new("RGB", (512, 512), "white")
    uri = ev.thumbnail_uri(photo, [{"type": "spot", "box": [100, 100, 300, 300]}])
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    assert thumb.size == (256, 256)
    r, g, b = thumb.getpixel((50, 100))  # on the left edge of the box at half scale
    assert r > 180 and g < 90 and b < 90
    assert thumb.getpixel((100, 100))[1] > 200  # inside the box stays white


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
    assert results["version"] == 1
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
                  max_new_tokens=4, gallery_size=2, device="cpu")  # fmt: skip
    ev.evaluate(cfg)
    results = json.loads((out / "results.json").read_text())
    assert "--base" in results["models"]["base"]["how"] and "merged" in results["models"]["tuned"]["how"]
    # Here the "merged" folder is the base itself, so both columns must agree exactly.
    for img in results["images"]:
        assert img["p_ng"]["base"] == pytest.approx(img["p_ng"]["tuned"], abs=1e-6)
    assert results["training"]["rows"] == []

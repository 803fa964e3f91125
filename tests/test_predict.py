"""The Predictor (score and describe modes) and the `vlm-inspect predict` verb on the tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vlm_inspect.cli import app
from vlm_inspect.config import ModelSettings
from vlm_inspect.errors import ModelFolderError
from vlm_inspect.inference import Predictor, verdict_token_ids

runner = CliRunner()


@pytest.fixture(scope="module")
def lora_run(trained_run) -> Path:
    return trained_run()


@pytest.fixture(scope="module")
def full_run(trained_run) -> Path:
    """All weights trained: the tiny model learns the answer format in a few dozen steps."""
    return trained_run(method="full", lr=1e-3, projector_lr=1e-3, min_steps=80) / "model"


@pytest.fixture(scope="module")
def photos(spot_dataset: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((spot_dataset / "images").glob("*.png"))]


def test_score_and_describe_agree_on_the_verdict(full_run: Path, photos: list):
    predictor = Predictor.load(ModelSettings(model=full_run, device="cpu"))
    question = "Is this box OK or NG?"  # the spot dataset's training question
    p_ng = predictor.score(photos, question, batch_size=5)
    answers = predictor.describe(photos, question, max_new_tokens=3, batch_size=5)
    assert all(a.startswith(("OK", "NG")) for a in answers), answers  # it learned the answer format
    for p, answer in zip(p_ng, answers, strict=True):
        assert (p >= 0.5) == answer.startswith("NG"), (p, answer)
    # batching does not change scores (left padding, last position only)
    one_by_one = [predictor.score([im], question)[0] for im in photos[:3]]
    assert one_by_one == pytest.approx(p_ng[:3], abs=1e-5)


def test_base_scores_come_from_the_same_weights(tiny_model_dir: Path, lora_run: Path, photos: list):
    tuned = Predictor.load(ModelSettings(model=tiny_model_dir, adapter=lora_run, device="cpu"))
    base = Predictor.load(ModelSettings(model=tiny_model_dir, device="cpu"))
    with tuned.adapter_disabled():
        off = tuned.score(photos[:4], "Is it OK?")
    assert off == pytest.approx(base.score(photos[:4], "Is it OK?"), abs=1e-6)
    assert tuned.default_question == base.default_question.replace("product", "box")  # the run's product word
    with pytest.raises(ModelFolderError, match="no adapter"), base.adapter_disabled():
        pass


def test_verdict_tokens_differ_and_are_found(tiny_model_dir: Path):
    from vlm_inspect.models.load import load_processor

    ok, ng = verdict_token_ids(load_processor(tiny_model_dir).tokenizer)
    assert ok and ng and not set(ok) & set(ng)


def test_predict_verb_writes_a_row_per_image_and_reports_bad_files(
    tmp_path: Path, tiny_model_dir: Path, lora_run: Path, spot_dataset: Path
):
    folder = tmp_path / "line"
    (folder / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((spot_dataset / "images").glob("*.png"))[:3]):
        (folder / "sub" / f"p{i}.png").write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "preds.jsonl"
    args = ["predict", str(folder), "--model", str(tiny_model_dir), "--adapter", str(lora_run), "--out", str(out)]
    result = runner.invoke(app, [*args, "--describe", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    bad = next(r for r in rows if r["path"].endswith("broken.jpg"))
    assert bad["verdict"] == "ERROR" and "broken.jpg" in bad["error"]
    good = [r for r in rows if r is not bad]
    assert all(r["verdict"] in ("OK", "NG") and 0 <= r["p_ng"] <= 1 and "description" in r for r in good)
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "exists" in again.output  # never overwritten silently
    csv_out = tmp_path / "preds.csv"
    result = runner.invoke(app, [*args[:-1], str(csv_out), "--threshold", "0.0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with csv_out.open() as f:
        table = list(csv.DictReader(f))
    assert [r["verdict"] for r in table if r["verdict"] != "ERROR"] == ["NG"] * 3  # threshold 0 → all NG

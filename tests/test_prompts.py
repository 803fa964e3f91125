"""Prompt templates: the shipped file's rules, verdict words, location grid, and checks on edited files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlm_inspect.data.prompts import PROMPTS_FILE, load_prompts, location_word, parse_verdict
from vlm_inspect.errors import DataError


@pytest.mark.parametrize("language", ["en", "zh"])
def test_shipped_prompts_meet_the_rules(language: str) -> None:
    prompts = load_prompts(language)
    assert len(prompts.verdict_questions) >= 10
    assert len(prompts.heldout_questions) >= 5
    assert len(prompts.describe_questions) >= 3
    assert not set(prompts.verdict_questions) & set(prompts.heldout_questions)
    assert "box" in prompts.default_question("box")
    assert prompts.default_question("box") == prompts.verdict_questions[0].format(product="box")


def test_verdict_answers_start_with_a_parseable_word() -> None:
    en, zh = load_prompts("en"), load_prompts("zh")
    assert en.verdict_answer("NG", en.defect_sentence("black_spot", "top left", "box")) == (
        "NG. There is a black spot near the top left corner of the box."
    )
    assert en.verdict_answer("OK", en.ok_sentence("box")) == "OK. The box has no visible defects."
    assert zh.verdict_answer("NG", zh.defect_sentence("划痕", "左上", "盒子")) == "NG。盒子左上角附近有划痕。"
    for answer in ("OK. fine", "NG。盒子", " ng: bad", "**OK**"):
        assert parse_verdict(answer) in ("OK", "NG")
    assert parse_verdict("Okay, looks good") is None
    assert parse_verdict("The box is NG") is None


def test_articles_and_unknown_defects() -> None:
    en, zh = load_prompts("en"), load_prompts("zh")
    assert en.a_defect("oil_stain") == "an oil stain"
    assert en.a_defect("Black-Spot") == "a black spot"
    assert en.a_defect("defect") == "a defect"
    assert zh.a_defect("defect") == "缺陷"
    assert en.defect_sentence(None, None, "box") == "The box has a visible defect."
    assert en.defect_sentence("dent", None, "box") == "There is a dent on the box."


@pytest.mark.parametrize(
    ("centre", "en", "zh"),
    [
        ((10, 10), "top left", "左上"),
        ((50, 10), "top", "上"),
        ((90, 10), "top right", "右上"),
        ((10, 50), "left", "左"),
        ((50, 50), "center", "中"),
        ((90, 50), "right", "右"),
        ((10, 90), "bottom left", "左下"),
        ((50, 90), "bottom", "下"),
        ((90, 90), "bottom right", "右下"),
    ],
)
def test_location_word_uses_the_box_centre_on_a_3x3_grid(centre: tuple[int, int], en: str, zh: str) -> None:
    x, y = centre
    box = [x - 2, y - 2, x + 2, y + 2]
    assert location_word(box, 100, 100, "en") == en
    assert location_word(box, 100, 100, "zh") == zh


def test_location_word_is_relative_to_image_size() -> None:
    # A box filling the left half of a wide image is centred in the left third only if x < 1/3 of width.
    assert location_word([0, 0, 60, 100], 200, 100, "en") == "left"
    assert location_word([0, 0, 200, 100], 200, 100, "en") == "center"
    assert location_word([190, 90, 200, 100], 200, 100, "en") == "bottom right"


def test_edited_file_problems_are_all_reported(tmp_path: Path) -> None:
    data = yaml.safe_load(PROMPTS_FILE.read_text(encoding="utf-8"))
    section = data["en"]
    section["verdict_questions"] = section["verdict_questions"][:3] + ["Is this {prodcut} OK?"]
    section["heldout_questions"].append(section["verdict_questions"][0])
    del section["answers"]["defect_at"]
    section["answers"]["ok"] = "OK. fine"
    section["locations"].pop("center")
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")

    with pytest.raises(DataError) as err:
        load_prompts("en", path)

    message = str(err.value)
    assert message.startswith(str(path))
    for expected in (
        "needs at least 10, has 4",
        "unknown placeholder {prodcut}",
        "is also a verdict question",
        "answers.defect_at: missing",
        "answers.ok: must not start with OK/NG",
        "locations: missing center",
    ):
        assert expected in message
    # The other language in the same file is still fine.
    assert load_prompts("zh", path).language == "zh"


def test_unsupported_language_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'fr' is not supported"):
        load_prompts("fr")
    with pytest.raises(DataError, match="no such prompts file"):
        load_prompts("en", tmp_path / "none.yaml")

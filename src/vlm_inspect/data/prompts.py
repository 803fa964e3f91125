"""The question and answer templates of training conversations, read from `prompts.yaml`.

One data file holds every wording, per language, so a quality team can edit them without
touching code. What stays in code is what other parts parse: the verdict word at the start of
each first answer (`OK.` / `NG.`, zh `OK。` / `NG。`) and the 3x3 grid of location words.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from vlm_inspect.errors import DataError

PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")

VERDICTS = ("OK", "NG")

UNKNOWN_DEFECT = "defect"
"""Defect type stored when a box or mask has no type; answers use the language's `unknown_defect` word."""

# Rows top → bottom, columns left → right.
GRID_WORDS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "en": (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right")),
    "zh": (("左上", "上", "右上"), ("左", "中", "右"), ("左下", "下", "右下")),
}

_VERDICT_SEPARATOR = {"en": ". ", "zh": "。"}
_SENTENCE_JOINER = {"en": " ", "zh": ""}
_SENTENCE_END = {"en": ".", "zh": "。"}
_ANSWER_KEYS = ("ok", "ng", "defect", "defect_at", "several")
_PLACEHOLDERS = {"product", "a_defect", "location", "n"}
_INTRO_KEYS = {"one": {"product"}, "many": {"product", "n"}}
_MIN_COUNTS = {"verdict_questions": 10, "heldout_questions": 5, "describe_questions": 1, "locate_questions": 1}
_VERDICT_AT_START = re.compile(r"^\W*(OK|NG)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Prompts:
    """The templates of one language; `{product}` is still unfilled in every string."""

    language: str
    source: Path
    default_product: str
    unknown_defect: str
    verdict_questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]
    describe_questions: tuple[str, ...]
    locate_questions: tuple[str, ...]
    answers: dict[str, str]
    locations: dict[str, str]
    reference_intro: dict[str, str]
    """`one` and `many` (`{n}` references): the sentence before the first question when references come first."""

    def default_question(self, product: str | None = None) -> str:
        """The question predict and serve ask: the first verdict question, product filled in."""
        return self.verdict_questions[0].format(product=product or self.default_product)

    def verdict_answer(self, label: str, sentence: str) -> str:
        """`OK. <sentence>` / `NG. <sentence>`: the fixed verdict word first, so answers parse."""
        return f"{label}{_VERDICT_SEPARATOR[self.language]}{sentence}"

    def ok_sentence(self, product: str) -> str:
        """The sentence after `OK.` when nothing else is known about the photo."""
        return self.answers["ok"].format(product=product)

    def defect_sentence(self, defect_type: str | None, location: str | None, product: str) -> str:
        """One sentence about one defect; type and location when known.

        Args:
            defect_type: Folder-style name such as `black_spot`; None when unknown.
            location: A grid word from `location_word`; None when unknown.
            product: The product word.
        """
        if defect_type is None and location is None:
            return self.answers["ng"].format(product=product)
        a_defect = self.a_defect(defect_type)
        if location is None:
            return self.answers["defect"].format(product=product, a_defect=a_defect)
        phrase = self.locations[location]
        return self.answers["defect_at"].format(product=product, a_defect=a_defect, location=phrase)

    def reference_question(self, question: str, n: int, product: str) -> str:
        """`question` (its product filled in) after the sentence that says the first `n` pictures are references."""
        intros = tuple(self.reference_intro[k].format(product=product, n="{n}") for k in ("one", "many"))
        return with_reference(question.format(product=product), intros, n, self.language)

    def several_sentence(self, n: int) -> str:
        """The sentence that says how many defects there are."""
        return self.answers["several"].format(n=n)

    def a_defect(self, defect_type: str | None) -> str:
        """`scratch` → `a scratch`, `oil_stain` → `an oil stain` (no article in Chinese)."""
        known = defect_type and defect_type != UNKNOWN_DEFECT
        name = defect_name(defect_type) if known else self.unknown_defect
        if self.language != "en":
            return name
        return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"

    def join_sentences(self, sentences: list[str]) -> str:
        """Sentences of one answer, capitalised and ended with a full stop where missing, spaced per language."""
        ended = [
            s if s[-1] in ".!?。！？" else s + _SENTENCE_END[self.language] for s in map(str.strip, sentences) if s
        ]
        return _SENTENCE_JOINER[self.language].join(s[0].upper() + s[1:] for s in ended)

    def as_dict(self, product: str) -> dict[str, Any]:
        """The templates with the product filled into questions, for the dataset manifest."""
        return {
            "file": str(self.source),
            "language": self.language,
            "product": product,
            "default_question": self.default_question(product),
            "verdict_questions": [q.format(product=product) for q in self.verdict_questions],
            "heldout_questions": [q.format(product=product) for q in self.heldout_questions],
            "describe_questions": [q.format(product=product) for q in self.describe_questions],
            "locate_questions": [q.format(product=product) for q in self.locate_questions],
            "answers": dict(self.answers),
            "locations": dict(self.locations),
        }

    def reference_intros(self, product: str) -> dict[str, str]:
        """`one` and `many` with the product filled in (`{n}` left), for the manifest of a dataset with references."""
        return {k: v.format(product=product, n="{n}") for k, v in self.reference_intro.items()}


def with_reference(question: str, intros: tuple[str, ...] | list[str], n: int, language: str | None) -> str:
    """The question asked with `n` references first: `intros` (one, many with `{n}`) then the question, spaced as the
    language spaces sentences. Prepare writes training questions with it, and every verb asks with it."""
    intro = intros[0] if n == 1 else intros[1].format(n=n)
    return f"{intro}{_SENTENCE_JOINER.get(language or 'en', ' ')}{question.strip()}"


def defect_name(defect_type: str) -> str:
    """Folder-style defect type as words: `black_spot` / `Black-Spot` → `black spot`."""
    return " ".join(re.split(r"[\s_\-]+", defect_type.strip())).lower()


def location_word(box: list[float], width: int, height: int, language: Literal["en", "zh"] = "en") -> str:
    """Where a box lies on a 3x3 grid over the image, from its centre: `top left` … `bottom right`.

    Args:
        box: `[x0, y0, x1, y1]` in pixels of the upright image.
        width: Image width in pixels.
        height: Image height in pixels.
        language: `en` (top left, top, …, center, …) or `zh` (左上, 上, …, 中, …).
    """
    x0, y0, x1, y1 = box
    column = _third((x0 + x1) / 2 / width)
    row = _third((y0 + y1) / 2 / height)
    return GRID_WORDS[language][row][column]


def _third(fraction: float) -> int:
    return min(2, max(0, int(fraction * 3)))


def parse_verdict(answer: str) -> str | None:
    """`OK` or `NG` when an answer starts with one (case-insensitive), else None."""
    match = _VERDICT_AT_START.match(answer)
    return match.group(1).upper() if match else None


def load_prompts(language: str = "en", path: str | Path | None = None) -> Prompts:
    """Read and check one language's templates.

    Args:
        language: `en` or `zh`.
        path: A user-edited copy of prompts.yaml; default is the shipped file.

    Raises:
        DataError: naming the file and every problem found in it.
    """
    source = Path(path) if path is not None else PROMPTS_FILE
    section = _read_language_section(source, language)
    problems = _section_problems(section, language)
    if problems:
        raise DataError(
            f"{source}: {len(problems)} problem(s) in language '{language}':\n  - " + "\n  - ".join(problems)
        )
    return Prompts(
        language=language,
        source=source,
        default_product=str(section["default_product"]),
        unknown_defect=str(section["unknown_defect"]),
        verdict_questions=tuple(section["verdict_questions"]),
        heldout_questions=tuple(section["heldout_questions"]),
        describe_questions=tuple(section["describe_questions"]),
        locate_questions=tuple(section["locate_questions"]),
        answers={k: section["answers"][k] for k in _ANSWER_KEYS},
        locations=dict(section["locations"]),
        reference_intro={k: section["reference_intro"][k] for k in _INTRO_KEYS},
    )


def _read_language_section(source: Path, language: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{source}: no such prompts file") from None
    except yaml.YAMLError as err:
        raise DataError(f"{source}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a mapping of languages, got {type(data).__name__}")
    if language not in GRID_WORDS:
        raise DataError(f"{source}: language '{language}' is not supported (supported: {', '.join(GRID_WORDS)})")
    section = data.get(language)
    if not isinstance(section, dict):
        raise DataError(f"{source}: no section for language '{language}' (found: {', '.join(map(str, data))})")
    return section


def _section_problems(section: dict[str, Any], language: str) -> list[str]:
    problems = []
    for key in ("default_product", "unknown_defect"):
        if not isinstance(section.get(key), str) or not section[key].strip():
            problems.append(f"{key}: must be a non-empty text")
    for key, least in _MIN_COUNTS.items():
        problems += _question_list_problems(key, section.get(key), least)
    verdict, heldout = section.get("verdict_questions"), section.get("heldout_questions")
    if isinstance(verdict, list) and isinstance(heldout, list):
        shared = set(map(str, verdict)) & set(map(str, heldout))
        problems += [f"heldout_questions: {q!r} is also a verdict question (held-out ones must differ)" for q in shared]
    problems += _answer_problems(section.get("answers"))
    problems += _intro_problems(section.get("reference_intro"))
    problems += _location_problems(section.get("locations"), language)
    return problems


def _question_list_problems(key: str, questions: Any, least: int) -> list[str]:
    if not isinstance(questions, list) or not all(isinstance(q, str) and q.strip() for q in questions):
        return [f"{key}: must be a list of non-empty texts"]
    problems = []
    if len(questions) < least:
        problems.append(f"{key}: needs at least {least}, has {len(questions)}")
    if len(set(questions)) != len(questions):
        problems.append(f"{key}: has repeated questions")
    for q in questions:
        if "<image>" in q:
            problems.append(f"{key}: {q!r} contains <image> (it is added automatically)")
        problems += [f"{key}: {q!r}: {p}" for p in _placeholder_problems(q, {"product"})]
    return problems


def _answer_problems(answers: Any) -> list[str]:
    if not isinstance(answers, dict):
        return [f"answers: must be a mapping with {', '.join(_ANSWER_KEYS)}"]
    problems = []
    for key in _ANSWER_KEYS:
        text = answers.get(key)
        if not isinstance(text, str) or not text.strip():
            problems.append(f"answers.{key}: missing or empty")
            continue
        problems += [f"answers.{key}: {p}" for p in _placeholder_problems(text, _PLACEHOLDERS)]
        if parse_verdict(text):
            problems.append(f"answers.{key}: must not start with OK/NG (the verdict word is added automatically)")
    return problems


def _intro_problems(intro: Any) -> list[str]:
    if not isinstance(intro, dict):
        return ["reference_intro: must be a mapping with one and many"]
    problems = []
    for key, allowed in _INTRO_KEYS.items():
        text = intro.get(key)
        if not isinstance(text, str) or not text.strip():
            problems.append(f"reference_intro.{key}: missing or empty")
            continue
        problems += [f"reference_intro.{key}: {p}" for p in _placeholder_problems(text, allowed)]
    return problems


def _location_problems(locations: Any, language: str) -> list[str]:
    expected = {word for row in GRID_WORDS[language] for word in row}
    if not isinstance(locations, dict):
        return [f"locations: must map each of {', '.join(sorted(expected))} to a phrase"]
    problems = []
    missing, extra = expected - set(locations), set(locations) - expected
    if missing:
        problems.append(f"locations: missing {', '.join(sorted(missing))}")
    if extra:
        problems.append(f"locations: unknown grid words {', '.join(sorted(map(str, extra)))}")
    problems += [f"locations.{k}: must be a non-empty text" for k, v in locations.items() if not str(v or "").strip()]
    return problems


def _placeholder_problems(template: str, allowed: set[str]) -> list[str]:
    try:
        names = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as err:
        return [f"bad braces ({err}); write {{{{ and }}}} for literal braces"]
    unknown = sorted(n for n in names if n not in allowed)
    return [f"unknown placeholder {{{n}}} (allowed: {', '.join(sorted(allowed))})" for n in unknown]

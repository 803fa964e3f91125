"""Render report.html from results.json alone: tables, inline SVG plots and a gallery, no network.

The report can be rebuilt from a results.json (`write_report`) without the model, the images or
the run folder: thumbnails and training-loss rows are embedded in results.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from vlm_inspect.errors import DataError
from vlm_inspect.evaluation.metrics import wilson_interval
from vlm_inspect.evaluation.views import warning as view_warning

TEMPLATE = "report.html.j2"
MODELS = ("base", "tuned")
MODEL_TITLES = {"base": "Base (before)", "tuned": "Tuned (after)"}
QUESTION_KINDS = {"training": "training wording", "heldout": "held-out wording", "extra": "your question (held-out)"}
COLORS = {"base": "#c2610c", "tuned": "#1f5fbf", "OK": "#2e7d32", "NG": "#c62828", "grid": "#d0d4da"}
TRUTH_COLOR = "#19c832"  # true boxes: solid; each model's boxes: dashed, in its colour
COMPARE_COLORS = ("#9c27b0", "#00838f", "#6d4c41", "#d81b60")
# Below this many images of a class, even a perfect score says little about the line (3/n rule).
SMALL_CLASS = 100


def write_report(results_json: Path, out_html: Path) -> Path:
    """Render the HTML report from a results.json written by `evaluate`.

    Args:
        results_json: the results file.
        out_html: the HTML file to write (one self-contained file).

    Returns:
        The path written.

    Raises:
        DataError: results_json is missing, not JSON, or lacks the keys the report needs.
    """
    results = read_results(Path(results_json))
    html = render_report(results)
    Path(out_html).write_text(html, encoding="utf-8")
    return Path(out_html)


def read_results(path: Path) -> dict:
    """Load results.json and check the keys the report reads."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such results file") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in ("version", "models", "questions", "metrics", "images", "data") if k not in results]
    if missing:
        raise DataError(f"{path}: not an evaluate results file (missing {', '.join(missing)})")
    return results


def render_report(results: dict) -> str:
    """The report's HTML text for a loaded results mapping."""
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = fmt_pct
    env.filters["interval"] = fmt_interval
    env.filters["num"] = fmt_num
    env.globals["boxes_svg"] = lambda img, loc: Markup(boxes_svg(img, loc["order"], loc["colors"]))
    return env.get_template(TEMPLATE).render(**report_context(results))


def report_context(results: dict) -> dict:
    """Everything the template shows, derived from results.json."""
    questions = results["questions"]
    main = default_question(questions)
    metrics = results["metrics"]
    threshold = results["config"]["threshold"]
    images = results["images"]
    return {
        "r": results,
        "models": MODELS,
        "titles": MODEL_TITLES,
        "kinds": QUESTION_KINDS,
        "main": main,
        "main_metrics": {m: metrics[m][main["id"]] for m in MODELS},
        "question_rows": question_rows(questions, metrics),
        "roc_svg": Markup(roc_svg({m: metrics[m][main["id"]]["roc"] for m in MODELS})),
        "hist_svgs": {m: Markup(histogram_svg(*class_scores(images, m, main["id"]), threshold)) for m in MODELS},
        "loss_svg": Markup(loss_svg(results.get("training", {}).get("rows", []))),
        "caveats": small_set_caveats(results["data"]["n_ok"], results["data"]["n_ng"]),
        "gallery": gallery_rows(images, main["id"], threshold),
        "comparison": results.get("comparison", []),
        "loc": localization_context(results),
        "reference": results.get("reference"),
        "view_warnings": [
            w
            for row in results.get("comparison", [])
            if row["key"] != "base" and (w := view_warning(row["view"], row["name"]))
        ],
    }


def default_question(questions: Sequence[dict]) -> dict:
    """The question marked default (the first training question)."""
    for q in questions:
        if q.get("default"):
            return q
    if not questions:
        raise DataError("results.json lists no questions")
    return questions[0]


def question_rows(questions: Sequence[dict], metrics: dict) -> list[dict]:
    """One row per question with both models' metric blocks."""
    return [{"q": q, **{m: metrics[m][q["id"]] for m in MODELS}} for q in questions]


def class_scores(images: Sequence[dict], model: str, qid: str) -> tuple[list[float], list[float]]:
    """p(NG) of OK images and of NG images for one model and question."""
    ok = [img["p_ng"][model][qid] for img in images if img["label"] == "OK"]
    ng = [img["p_ng"][model][qid] for img in images if img["label"] == "NG"]
    return ok, ng


def gallery_rows(images: Sequence[dict], qid: str, threshold: float) -> list[dict]:
    """Images that carry answers, with each model's score verdict and answer verdict judged."""
    rows = []
    for img in images:
        if not img.get("answers"):
            continue
        cells = {}
        for m in MODELS:
            p = img["p_ng"][m][qid]
            score_verdict = "NG" if p >= threshold else "OK"
            word = img.get("answer_verdicts", {}).get(m)
            cells[m] = {
                "answer": img["answers"].get(m, ""),
                "p_ng": p,
                "score_verdict": score_verdict,
                "score_right": score_verdict == img["label"],
                "answer_verdict": word,
                "answer_right": None if word is None else word == img["label"],
            }
        rows.append({"img": img, **cells})
    # Mistakes first: the tuned model's, then the base's (False sorts before True).
    rows.sort(key=lambda row: (row["tuned"]["score_right"], row["base"]["score_right"]))
    return rows


def localization_context(results: dict) -> dict:
    """The localization section and the gallery's boxes: which models located (in table order), their colours,
    names and measures, and the per-defect-type rows. `block` is None for a results.json without localization."""
    block = results.get("localization")
    measured = (block or {}).get("models", {})
    order = ["tuned", "base", *(row["key"] for row in results.get("comparison", []))]
    keys = [key for key in dict.fromkeys(order) if key in measured]
    keys += [key for key in measured if key not in keys]
    compare = [key for key in keys if key not in MODELS]
    colors = {
        **{m: COLORS[m] for m in MODELS},
        **{k: COMPARE_COLORS[i % len(COMPARE_COLORS)] for i, k in enumerate(compare)},
    }
    names = {key: MODEL_TITLES.get(key, measured[key]["name"]) for key in keys}
    types = sorted({t["type"] for key in keys for t in measured[key]["per_type"]})
    type_rows = [
        {"type": kind, **{key: next((t for t in measured[key]["per_type"] if t["type"] == kind), None) for key in keys}}
        for kind in types
    ]
    return {
        "block": block,
        "order": keys,
        "colors": colors,
        "names": names,
        "truth_color": TRUTH_COLOR,
        "type_rows": type_rows,
    }


def boxes_svg(img: dict, keys: Sequence[str], colors: dict[str, str]) -> str:
    """The photo's true boxes (solid) and each model's boxes (dashed, in its colour) as an SVG laid over its
    thumbnail, in the photo's own pixels; empty when the photo's size is unknown or it has no box to draw."""
    size = img.get("size")
    if not size:
        return ""
    parts = [_box_rect(d["box"], TRUTH_COLOR, "truth", d.get("type")) for d in img.get("defects") or [] if _drawable(d)]
    for key in keys:
        row = (img.get("located") or {}).get(key)
        parts += [_box_rect(d["box"], colors[key], key, d.get("type")) for d in (row or {}).get("defects", [])]
    if not parts:
        return ""
    width, height = size
    return (
        f'<svg class="boxes" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img" '
        f'aria-label="true and predicted defect boxes">' + "".join(parts) + "</svg>"
    )


def _drawable(defect: dict) -> bool:
    box = defect.get("box")
    return isinstance(box, (list, tuple)) and len(box) == 4 and box[2] > box[0] and box[3] > box[1]


def _box_rect(box: Sequence[float], color: str, who: str, label: str | None) -> str:
    x0, y0, x1, y1 = box
    # A pale halo keeps a box visible on dark and light surfaces; a model's halo is dashed like its box, so a
    # true box underneath shows through the gaps where the two coincide.
    dash = "" if who == "truth" else ' stroke-dasharray="6 3"'
    title = f"<title>{escape(label)}</title>" if label else ""
    shape = f'x="{x0:g}" y="{y0:g}" width="{x1 - x0:g}" height="{y1 - y0:g}" fill="none"{dash}'
    return (
        f'<g class="box box-{escape(who)}" data-box="{escape(who)}">{title}'
        f'<rect {shape} stroke="#fff" stroke-opacity="0.7" stroke-width="4" vector-effect="non-scaling-stroke"/>'
        f'<rect {shape} stroke="{color}" stroke-width="2" vector-effect="non-scaling-stroke"/>'
        "</g>"
    )


def small_set_caveats(n_ok: int, n_ng: int) -> list[str]:
    """Warnings that a small set only bounds the error rates loosely (0 errors in n → up to ~3/n)."""
    notes = []
    for n, rate, cls in ((n_ng, "escape", "NG"), (n_ok, "overkill", "OK")):
        if n == 0:
            notes.append(f"There are no {cls} images, so the {rate} rate cannot be measured at all.")
        elif n < SMALL_CLASS:
            upper = wilson_interval(0, n)[1]
            notes.append(
                f"Only {n} {cls} image{'s' if n != 1 else ''}: even with 0 {rate}s the true {rate} rate "
                f"could be up to {upper:.0%} (95% Wilson bound; about 3/n on larger sets). "
                "Line-grade claims need hundreds."
            )
    return notes


# ---------------------------------------------------------------- formatting


def fmt_pct(value: float | None, digits: int = 1) -> str:
    """0.1234 → '12.3%'; None → '–'."""
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def fmt_interval(est: dict) -> str:
    """'[2.1%–27.8%]' for an estimate with bounds, '' without."""
    if est.get("low") is None or est.get("high") is None:
        return ""
    return f"[{fmt_pct(est['low'])}–{fmt_pct(est['high'])}]"


def fmt_num(value: float | None, digits: int = 3) -> str:
    """A plain number with fixed decimals; None → '–'."""
    return "–" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------- SVG plots

W, H = 320, 240
PAD_L, PAD_R, PAD_T, PAD_B = 44, 12, 24, 36


def _x(v: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return PAD_L + (v - lo) / ((hi - lo) or 1.0) * (W - PAD_L - PAD_R)


def _y(v: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return H - PAD_B - (v - lo) / ((hi - lo) or 1.0) * (H - PAD_T - PAD_B)


def _svg(body: list[str], label: str) -> str:
    return (
        f'<svg class="plot" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(label)}">' + "".join(body) + "</svg>"
    )


def _axes(x_label: str, y_label: str, x_ticks: Sequence[tuple[float, str]], y_ticks: Sequence[tuple[float, str]]):
    """Frame, grid lines and tick labels; ticks are given in pixel positions."""
    parts = [
        f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
        f'fill="none" stroke="{COLORS["grid"]}"/>'
    ]
    for px, text in x_ticks:
        parts.append(f'<line x1="{px:.1f}" y1="{PAD_T}" x2="{px:.1f}" y2="{H - PAD_B}" stroke="{COLORS["grid"]}"/>')
        parts.append(f'<text x="{px:.1f}" y="{H - PAD_B + 14}" text-anchor="middle">{escape(text)}</text>')
    for py, text in y_ticks:
        parts.append(f'<line x1="{PAD_L}" y1="{py:.1f}" x2="{W - PAD_R}" y2="{py:.1f}" stroke="{COLORS["grid"]}"/>')
        parts.append(f'<text x="{PAD_L - 4}" y="{py + 4:.1f}" text-anchor="end">{escape(text)}</text>')
    parts.append(f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 4}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(
        f'<text transform="translate(11 {(PAD_T + H - PAD_B) / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(y_label)}</text>"
    )
    return parts


def _unit_ticks() -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    marks = [0.0, 0.25, 0.5, 0.75, 1.0]
    return [(_x(v), f"{v:g}") for v in marks], [(_y(v), f"{v:g}") for v in marks]


def _polyline(xs: Sequence[float], ys: Sequence[float], color: str, cls: str = "") -> str:
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
    return f'<polyline class="{cls}" points="{points}" fill="none" stroke="{color}" stroke-width="2"/>'


def _legend(items: Sequence[tuple[str, str]]) -> list[str]:
    """One row of coloured keys in the top margin, clear of the data."""
    parts = []
    for i, (text, color) in enumerate(items):
        x = PAD_L + i * 120
        parts.append(f'<rect x="{x}" y="{PAD_T - 17}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 14}" y="{PAD_T - 8}">{escape(text)}</text>')
    return parts


def roc_svg(curves: dict[str, dict]) -> str:
    """ROC curves (overkill on x, NG caught on y) for each model, with the chance diagonal."""
    x_ticks, y_ticks = _unit_ticks()
    body = _axes("overkill (OK rejected)", "NG caught = 1 − escape", x_ticks, y_ticks)
    body.append(
        f'<line x1="{_x(0)}" y1="{_y(0)}" x2="{_x(1)}" y2="{_y(1)}" stroke="{COLORS["grid"]}" stroke-dasharray="4 3"/>'
    )
    for model, roc in curves.items():
        xs = [_x(v) for v in roc["fpr"]]
        ys = [_y(v) for v in roc["tpr"]]
        body.append(_polyline(xs, ys, COLORS[model], f"roc-{model}"))
    body += _legend([(MODEL_TITLES[m], COLORS[m]) for m in curves])
    return _svg(body, "ROC curves of the base and tuned models")


def histogram_svg(ok: Sequence[float], ng: Sequence[float], threshold: float, bins: int = 10) -> str:
    """p(NG) histograms of OK and NG images side by side in each bin, with the threshold marked."""
    counts = {cls: _bin_counts(scores, bins) for cls, scores in (("OK", ok), ("NG", ng))}
    top = max(1, *counts["OK"], *counts["NG"])
    x_ticks = [(_x(v), f"{v:g}") for v in (0.0, 0.5, 1.0)]
    y_ticks = [(_y(v, 0, top), str(v)) for v in sorted({0, top // 2, top})]
    body = _axes("p(NG)", "images", x_ticks, y_ticks)
    bar_w = (_x(1) - _x(0)) / bins / 2
    for b in range(bins):
        for j, cls in enumerate(("OK", "NG")):
            c = counts[cls][b]
            if c:
                x0 = _x(b / bins) + j * bar_w
                body.append(
                    f'<rect class="bar-{cls}" x="{x0:.1f}" y="{_y(c, 0, top):.1f}" width="{bar_w - 1:.1f}" '
                    f'height="{_y(0, 0, top) - _y(c, 0, top):.1f}" fill="{COLORS[cls]}"/>'
                )
    tx = _x(min(max(threshold, 0.0), 1.0))
    body.append(
        f'<line x1="{tx:.1f}" y1="{PAD_T}" x2="{tx:.1f}" y2="{H - PAD_B}" stroke="#333" stroke-dasharray="3 3"/>'
    )
    body += _legend([(f"OK images ({len(ok)})", COLORS["OK"]), (f"NG images ({len(ng)})", COLORS["NG"])])
    return _svg(body, "p(NG) histograms of OK and NG images")


def _bin_counts(scores: Sequence[float], bins: int) -> list[int]:
    counts = [0] * bins
    for s in scores:
        counts[min(bins - 1, max(0, int(s * bins)))] += 1
    return counts


def loss_svg(rows: Sequence[dict]) -> str:
    """The training loss per step from metrics.jsonl rows; empty string when there are none."""
    points = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and r.get("step") is not None]
    if len(points) < 2:
        return ""
    steps, losses = zip(*points, strict=True)
    lo, hi = 0.0, max(losses) * 1.05 or 1.0
    s_lo, s_hi = min(steps), max(steps)
    x_ticks = [(_x(s, s_lo, s_hi), f"{s:g}") for s in (s_lo, (s_lo + s_hi) / 2, s_hi)]
    y_ticks = [(_y(v, lo, hi), f"{v:.2g}") for v in (0.0, hi / 2, hi)]
    body = _axes("optimizer step", "training loss", x_ticks, y_ticks)
    body.append(_polyline([_x(s, s_lo, s_hi) for s in steps], [_y(v, lo, hi) for v in losses], COLORS["tuned"], "loss"))
    return _svg(body, "training loss per step")

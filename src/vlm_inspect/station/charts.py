"""The line view's charts as inline SVG text, drawn here like the report's (no script, no network).

`p_chart_svg`: NG share per period with the centre line, 3σ limits (steps, as they follow each
period's n) and the points that broke a run rule in red, numbered by rule. `histogram_svg`: the
recent window's p(NG) over the ten drift bins against the reference distribution's shares.
`latency_svg`: mean and slowest latency per period.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from vlm_inspect.station.drift import EDGES
from vlm_inspect.station.spc import PChart

COLORS = {"point": "#1f5fbf", "limit": "#c62828", "center": "#2e7d32", "grid": "#d0d4da", "ref": "#333"}
COLORS |= {"recent": "#1f5fbf", "max": "#9aa4b1"}
W, H = 760, 250
PAD_L, PAD_R, PAD_T, PAD_B = 52, 14, 26, 44


class _Frame:
    """Maps data to pixels inside the plot area of a W × H chart."""

    def __init__(self, n_x: float, y_hi: float, width: int = W, height: int = H):
        self.n_x, self.y_hi, self.w, self.h = max(n_x, 1), y_hi or 1.0, width, height

    def x(self, i: float) -> float:
        return PAD_L + (i + 0.5) / self.n_x * (self.w - PAD_L - PAD_R)

    def y(self, v: float) -> float:
        return self.h - PAD_B - v / self.y_hi * (self.h - PAD_T - PAD_B)


def _svg(body: list[str], label: str, width: int = W, height: int = H) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
        + "".join(body)
        + "</svg>"
    )


def _axes(
    f: _Frame, y_ticks: Sequence[tuple[float, str]], x_labels: Sequence[tuple[float, str]], title: str
) -> list[str]:
    parts = [
        f'<rect x="{PAD_L}" y="{PAD_T}" width="{f.w - PAD_L - PAD_R}" height="{f.h - PAD_T - PAD_B}" '
        f'fill="none" stroke="{COLORS["grid"]}"/>',
        f'<text x="{PAD_L}" y="{PAD_T - 9}" class="title">{escape(title)}</text>',
    ]
    for v, text in y_ticks:
        y = f.y(v)
        parts.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{f.w - PAD_R}" y2="{y:.1f}" stroke="{COLORS["grid"]}"/>')
        parts.append(f'<text x="{PAD_L - 5}" y="{y + 4:.1f}" text-anchor="end">{escape(text)}</text>')
    for x, text in x_labels:
        parts.append(f'<text x="{x:.1f}" y="{f.h - PAD_B + 15}" text-anchor="middle">{escape(text)}</text>')
    return parts


def _every(n: int, most: int = 7) -> int:
    return max(1, -(-n // most))


def short_label(label: str) -> str:
    """A period's label without its year (and a shift without its hours): '2026-12-03 B 14–22' → '12-03 B'."""
    text = label[5:] if len(label) >= 10 and label[4] == "-" else label
    parts = text.split(" ")
    return " ".join(parts[:2]) if len(parts) == 3 and "–" in parts[2] else text


def nice_ticks(hi: float, count: int = 4) -> list[float]:
    """Round tick values from 0 to at least `hi`: steps of 1, 2, 2.5 or 5 times a power of ten."""
    raw = (hi or 1.0) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return [step * i for i in range(math.ceil(hi / step - 1e-9) + 1)]


def _pct_ticks(ticks: Sequence[float]) -> list[tuple[float, str]]:
    digits = 1 if ticks[1] < 0.01 else 0
    return [(v, f"{v * 100:.{digits}f}%") for v in ticks]


def p_chart_svg(chart: PChart, title: str) -> str:
    """The p-chart of one line and model; an empty string when it has no points."""
    points = chart.points
    if not points or chart.center is None:
        return ""
    ticks = nice_ticks(max(max(p.ucl for p in points), max(p.p for p in points), 0.01) * 1.1)
    f = _Frame(len(points), ticks[-1])
    step = _every(len(points))
    labels = [(f.x(i), short_label(p.label)) for i, p in enumerate(points) if i % step == 0]
    body = _axes(f, _pct_ticks(ticks), labels, title)
    body.append(_steps(f, [p.ucl for p in points], "ucl"))
    body.append(_steps(f, [p.lcl for p in points], "lcl"))
    y_c = f.y(chart.center)
    body.append(
        f'<line class="center" x1="{PAD_L}" y1="{y_c:.1f}" x2="{W - PAD_R}" y2="{y_c:.1f}" '
        f'stroke="{COLORS["center"]}" stroke-width="1.5"/>'
    )
    xy = " ".join(f"{f.x(i):.1f},{f.y(p.p):.1f}" for i, p in enumerate(points))
    body.append(f'<polyline points="{xy}" fill="none" stroke="{COLORS["point"]}" stroke-width="1.2"/>')
    for i, p in enumerate(points):
        color = COLORS["limit"] if p.rules else COLORS["point"]
        cls = "point broke" if p.rules else "point"
        tip = f"{p.label}: {p.ng}/{p.n} NG = {p.p:.2%} (limits {p.lcl:.2%}–{p.ucl:.2%})"
        if p.rules:
            tip += "; rules " + ", ".join(map(str, p.rules))
        body.append(
            f'<circle class="{cls}" cx="{f.x(i):.1f}" cy="{f.y(p.p):.1f}" r="{4 if p.rules else 3}" fill="{color}">'
            f"<title>{escape(tip)}</title></circle>"
        )
        if p.rules:
            text = ",".join(map(str, p.rules))
            body.append(
                f'<text class="rule" x="{f.x(i):.1f}" y="{f.y(p.p) - 8:.1f}" text-anchor="middle" '
                f'fill="{COLORS["limit"]}">{text}</text>'
            )
    body += _legend(
        [("NG share", COLORS["point"]), (f"p̄ {chart.center:.2%}", COLORS["center"]), ("3σ limits", COLORS["limit"])]
    )
    return _svg(body, title)


def _steps(f: _Frame, values: Sequence[float], cls: str) -> str:
    """A step line: each period's limit held across its width."""
    half = (f.x(1) - f.x(0)) / 2 if len(values) > 1 else (f.w - PAD_L - PAD_R) / 2
    pts = []
    for i, v in enumerate(values):
        pts += [f"{f.x(i) - half:.1f},{f.y(v):.1f}", f"{f.x(i) + half:.1f},{f.y(v):.1f}"]
    return (
        f'<polyline class="{cls}" points="{" ".join(pts)}" fill="none" stroke="{COLORS["limit"]}" '
        'stroke-dasharray="5 3" stroke-width="1.2"/>'
    )


def _legend(items: Sequence[tuple[str, str]], width: int = W) -> list[str]:
    parts = []
    for i, (text, color) in enumerate(reversed(items)):
        x = width - PAD_R - 110 * (i + 1)
        parts.append(f'<rect x="{x}" y="{PAD_T - 18}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 14}" y="{PAD_T - 9}">{escape(text)}</text>')
    return parts


HIST_W = 380


def histogram_svg(recent: Sequence[int], expected: Sequence[float], title: str) -> str:
    """Shares of the recent window per p(NG) bin (bars) against the reference's (black steps)."""
    total = sum(recent)
    if not total or not expected:
        return ""
    got = [c / total for c in recent]
    ticks = nice_ticks(max(max(got), max(expected), 0.05) * 1.05)
    f = _Frame(len(got), ticks[-1], HIST_W)
    edges = [0.0, *EDGES, 1.0]
    labels = [
        (PAD_L + i / len(got) * (HIST_W - PAD_L - PAD_R), f"{e:.2f}".rstrip("0").rstrip("."))
        for i, e in enumerate(edges)
    ]
    body = _axes(f, _pct_ticks(ticks), labels[::2], title)
    width = (HIST_W - PAD_L - PAD_R) / len(got)
    for i, share in enumerate(got):
        x0 = PAD_L + i * width
        body.append(
            f'<rect class="bar-recent" x="{x0 + 1:.1f}" y="{f.y(share):.1f}" width="{width - 2:.1f}" '
            f'height="{f.y(0) - f.y(share):.1f}" fill="{COLORS["recent"]}" fill-opacity="0.75">'
            f"<title>{edges[i]:.3f}–{edges[i + 1]:.3f}: {recent[i]} ({share:.1%})</title></rect>"
        )
    pts = []
    for i, share in enumerate(expected):
        pts += [f"{PAD_L + i * width:.1f},{f.y(share):.1f}", f"{PAD_L + (i + 1) * width:.1f},{f.y(share):.1f}"]
    body.append(
        f'<polyline class="expected" points="{" ".join(pts)}" fill="none" stroke="{COLORS["ref"]}" stroke-width="2"/>'
    )
    body.append(
        f'<text x="{(PAD_L + HIST_W - PAD_R) / 2}" y="{H - 8}" text-anchor="middle">p(NG), bins equal on the logit scale</text>'
    )
    body += _legend([(f"recent ({total})", COLORS["recent"]), ("reference", COLORS["ref"])], HIST_W)
    return _svg(body, title, HIST_W)


def latency_svg(
    labels: Sequence[str], mean_ms: Sequence[float | None], max_ms: Sequence[float | None], title: str
) -> str:
    """Mean and slowest latency per period, in milliseconds; empty when no period has a latency."""
    seen = [v for v in max_ms if v is not None]
    if not seen:
        return ""
    ticks = nice_ticks(max(seen) * 1.1 or 1.0)
    f = _Frame(len(labels), ticks[-1])
    step = _every(len(labels))
    shown = [(f.x(i), short_label(t)) for i, t in enumerate(labels) if i % step == 0]
    body = _axes(f, [(v, f"{v:g}") for v in ticks], shown, title)
    for values, color, cls in ((max_ms, COLORS["max"], "lat-max"), (mean_ms, COLORS["point"], "lat-mean")):
        pts = " ".join(f"{f.x(i):.1f},{f.y(v):.1f}" for i, v in enumerate(values) if v is not None)
        body.append(f'<polyline class="{cls}" points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    body.append(f'<text transform="translate(12 {(PAD_T + H - PAD_B) / 2}) rotate(-90)" text-anchor="middle">ms</text>')
    body += _legend([("mean", COLORS["point"]), ("slowest", COLORS["max"])])
    return _svg(body, title)

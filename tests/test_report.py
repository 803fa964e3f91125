"""report.html from a hand-made results.json: self-contained, complete, and rendered by headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from conftest import CHROMIUM, CHROMIUM_FLAGS
from vlm_inspect.data.sources import Item
from vlm_inspect.errors import DataError
from vlm_inspect.evaluation import localization as loc
from vlm_inspect.evaluation.metrics import score_metrics
from vlm_inspect.evaluation.report import TRUTH_COLOR, write_report

QUESTIONS = [
    {"id": "q0", "text": "Is this box OK or NG?", "kind": "training", "default": True},
    {"id": "q1", "text": "Any defects on this box?", "kind": "heldout", "default": False},
]


def thumbnail(color: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_results(labels: list[str], base_p: list[float], tuned_p: list[float], with_answers: int) -> dict:
    """A results.json mapping shaped like evaluate's; the first `with_answers` images are in the gallery."""
    p = {"base": base_p, "tuned": tuned_p}
    images = []
    for i, label in enumerate(labels):
        shown = i < with_answers
        images.append(
            {
                "id": f"img{i:02d}",
                "path": f"images/{label.lower()}_{i}.png",
                "label": label,
                "defect_type": "spot" if label == "NG" else None,
                "defects": [{"type": "spot", "box": [3, 4, 20, 22]}] if label == "NG" else [],
                "description": "A black spot near the top left corner." if label == "NG" else None,
                # The held-out wording gets slightly worse scores, so the two rows differ.
                "p_ng": {m: {"q0": p[m][i], "q1": min(1.0, p[m][i] + 0.05)} for m in p},
                "answers": {"base": f"Yes, it looks defective {i}.", "tuned": f"{label}. answer {i}"}
                if shown
                else None,
                "answer_verdicts": {"base": None, "tuned": label} if shown else None,
                "thumbnail": thumbnail("white" if label == "OK" else "gray") if shown else None,
            }
        )
    metrics = {
        m: {q["id"]: score_metrics([img["p_ng"][m][q["id"]] for img in images], labels, 0.5, 0.0) for q in QUESTIONS}
        for m in p
    }
    return {
        "version": 1,
        "tool": {"name": "vlm-inspect", "version": "0.1.0"},
        "created": "2025-01-01T00:00:00+00:00",
        "config": {"threshold": 0.5, "max_escape": 0.0},
        "data": {
            "source": "dataset/val.json",
            "n_images": len(labels),
            "n_ok": labels.count("OK"),
            "n_ng": labels.count("NG"),
            "skipped": [{"path": "images/broken.png", "reason": "not an image"}],
        },
        "models": {
            "base": {"name": "tiny-llava", "model": "m", "adapter": None, "how": "adapter disabled"},
            "tuned": {"name": "tiny-llava + run", "model": "m", "adapter": "run", "how": "with adapter"},
        },
        "questions": QUESTIONS,
        "metrics": metrics,
        "images": images,
        "training": {"metrics_file": "run/metrics.jsonl", "rows": [{"step": s, "loss": 2.0 / s} for s in range(1, 9)]},
    }


LABELS = ["OK", "OK", "OK", "NG", "NG", "NG"]
BASE_P = [0.9, 0.8, 0.7, 0.9, 0.95, 0.6]  # calls everything NG, like stock LLaVA
TUNED_P = [0.1, 0.2, 0.6, 0.9, 0.8, 0.4]
# Gallery order: the tuned model's mistake (img02) first, then the base's (img00, img01), then the rest.
# img05 has no answers, so it has no gallery row.
GALLERY_ORDER = ["img02", "img00", "img01", "img03", "img04"]


@pytest.fixture
def results_file(tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(make_results(LABELS, BASE_P, TUNED_P, with_answers=5)), encoding="utf-8")
    return path


class DomSummary(HTMLParser):
    """Collects gallery rows, metric columns, images and every attribute value that could load a resource."""

    def __init__(self) -> None:
        super().__init__()
        self.gallery_ids: list[str] = []
        self.metric_columns: list[str] = []
        self.answer_models: list[str] = []
        self.srcs: list[str] = []
        self.links: list[str] = []
        self.polylines: list[str] = []
        self.boxes: dict[str, list[tuple[str, dict]]] = {}  # gallery image id → (who, first rect's attributes)
        self.viewboxes: list[str] = []
        self.toggles: list[str] = []
        self._image: str | None = None
        self._box: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if "gallery-item" in classes:
            self.gallery_ids.append(a["data-image-id"] or "")
            self._image = a["data-image-id"]
            self.boxes[self._image or ""] = []
        if tag == "svg" and "boxes" in classes:
            self.viewboxes.append(a.get("viewbox") or "")
        if tag == "g" and a.get("data-box") and self._image:
            self._box = a["data-box"]
        if tag == "rect" and self._box and self._image:
            self.boxes[self._image].append((self._box, a))
            self._box = None  # the halo's rect; the coloured one repeats its geometry
        if tag == "input" and (a.get("id") or "").startswith("show-"):
            self.toggles.append(a["id"] or "")
        if tag == "th" and a.get("data-model"):
            self.metric_columns.append(a["data-model"] or "")
        if "answer" in classes:
            self.answer_models.append(a.get("data-model") or "")
        if a.get("src"):
            self.srcs.append(a["src"] or "")
        if a.get("href"):
            self.links.append(a["href"] or "")
        if tag == "polyline":
            self.polylines.append(a.get("class") or "")


def add_localization(results: dict) -> dict:
    """Localization as evaluate records it: each NG photo's true box [3, 4, 20, 22] (48 × 32 photos); the tuned
    model boxes it exactly on every NG photo; the base boxes the whole photo, and one box on each OK photo."""
    items = [
        Item(img["id"], Path(img["path"]), img["path"], img["label"], img["defect_type"], img["defects"])
        for img in results["images"]
    ]
    plan = {
        "tuned": lambda label: [[3, 4, 20, 22]] if label == "NG" else [],
        "base": lambda label: [[0, 0, 48, 32]] if label == "NG" else [[30, 10, 40, 20]],
    }
    located = {
        key: {
            "question": "Locate each defect on this box with a bounding box.",
            "photos": {
                i.id: loc.located_photo(i, [{"type": "spot", "box": b} for b in boxes(i.label)], 0) for i in items
            },
        }
        for key, boxes in plan.items()
    }
    results["version"] = 2
    results["localization"] = loc.localization_results(items, located, {"tuned": "tiny-llava + run"}, None)
    for img in results["images"]:
        img["size"] = [48, 32]
        img["located"] = loc.photo_rows(img["id"], located)
    return results


def summarize(html: str) -> DomSummary:
    dom = DomSummary()
    dom.feed(html)
    return dom


def test_report_has_every_gallery_row_both_columns_and_no_network_reference(results_file: Path, tmp_path: Path):
    out = write_report(results_file, tmp_path / "report.html")
    html = out.read_text(encoding="utf-8")
    assert "http" not in html.lower()  # no CDN, fonts or links out; also no svg xmlns URL
    assert "@import" not in html and "url(" not in html
    dom = summarize(html)
    assert dom.gallery_ids == GALLERY_ORDER
    assert dom.metric_columns == ["base", "tuned"]
    assert dom.answer_models == ["base", "tuned"] * 5
    assert all(src.startswith("data:image/jpeg;base64,") for src in dom.srcs) and len(dom.srcs) == 5
    assert dom.links == []
    assert {"roc-base", "roc-tuned", "loss"} <= set(dom.polylines)
    for metric in ("accuracy", "balanced_accuracy", "escape_rate", "overkill_rate", "auc", "confusion"):
        assert f'data-metric="{metric}"' in html
    assert 'data-question="q0"' in html and 'data-question="q1"' in html
    assert 'id="caveat"' in html  # 3 OK and 3 NG is a small set
    assert "images/broken.png" in html


def test_report_shows_the_numbers_from_results(results_file: Path, tmp_path: Path):
    html = write_report(results_file, tmp_path / "report.html").read_text(encoding="utf-8")
    # Base calls all 3 OK NG: overkill 3/3; tuned rejects the OK at 0.6 only: 1/3, and misses the NG at 0.4.
    assert "100.0%" in html and "(3/3)" in html
    assert "33.3%" in html and "(1/3)" in html
    # Wilson interval of 1/3 is about [6.1%, 79.2%].
    assert "[6.1%–79.2%]" in html
    # Gallery marks: base answers "Yes ..." carry no verdict word; tuned ones do.
    assert "no OK/NG word" in html
    assert "✗ wrong" in html and "✓ right" in html


def test_report_handles_an_all_ok_set_with_reasons(tmp_path: Path):
    results = make_results(["OK", "OK"], [0.7, 0.2], [0.1, 0.2], with_answers=2)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    html = write_report(path, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "no NG images in the set" in html
    assert "There are no NG images" in html
    assert "nan" not in html.lower().replace("nano", "")


def test_missing_or_foreign_results_file_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="no such results file"):
        write_report(tmp_path / "nope.json", tmp_path / "r.html")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        write_report(bad, tmp_path / "r.html")
    other = tmp_path / "other.json"
    other.write_text('{"version": 1}', encoding="utf-8")
    with pytest.raises(DataError, match="missing"):
        write_report(other, tmp_path / "r.html")


def chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Headless Chromium with everything that could reach the network switched off."""
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(
    not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None, reason="Debian chromium not installed"
)
def test_report_renders_in_headless_chromium(results_file: Path, tmp_path: Path):
    report = write_report(results_file, tmp_path / "report.html")
    done = chromium("--dump-dom", report.resolve().as_uri(), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = summarize(done.stdout)
    assert dom.gallery_ids == GALLERY_ORDER
    assert dom.metric_columns == ["base", "tuned"]
    assert dom.answer_models == ["base", "tuned"] * 5

    # A phone-width screenshot: it must be a real, non-blank image of the page.
    shot = tmp_path / "phone.png"
    done = chromium(
        f"--screenshot={shot}",
        "--window-size=390,2000",
        "--hide-scrollbars",
        report.resolve().as_uri(),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (390, 2000)
        colors = im.convert("RGB").resize((39, 200)).getcolors(maxcolors=100_000)
        assert colors is not None and len(colors) > 20


# ---------------------------------------------------------------- localization


@pytest.fixture
def located_file(tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(add_localization(make_results(LABELS, BASE_P, TUNED_P, with_answers=5))), "utf-8")
    return path


def test_gallery_draws_true_and_predicted_boxes_in_photo_pixels(located_file: Path, tmp_path: Path):
    html = write_report(located_file, tmp_path / "report.html").read_text(encoding="utf-8")
    dom = summarize(html)
    assert dom.viewboxes == ["0 0 48 32"] * 5  # every gallery photo has an overlay in its own pixels
    for image_id in ("img03", "img04"):  # NG: the true box, the tuned model's on it, the base's over everything
        drawn = {who: (a["x"], a["y"], a["width"], a["height"]) for who, a in dom.boxes[image_id]}
        assert drawn == {
            "truth": ("3", "4", "17", "18"),
            "tuned": ("3", "4", "17", "18"),
            "base": ("0", "0", "48", "32"),
        }
    for image_id in ("img00", "img01", "img02"):  # OK: only the base's false alarm
        assert [(who, a["x"], a["width"]) for who, a in dom.boxes[image_id]] == [("base", "30", "10")]
    assert dom.toggles == ["show-tuned", "show-base"]
    assert "stroke-dasharray" in html and TRUTH_COLOR in html
    assert "http" not in html.lower()


def test_localization_table_shows_each_model_with_intervals(located_file: Path, tmp_path: Path):
    html = write_report(located_file, tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'id="localization-table"' in html and 'data-key="tuned"' in html and 'data-key="base"' in html
    table = html.split('id="localization-table"')[1].split("</table>")[0]
    tuned, base = table.split('data-key="tuned"')[1].split('data-key="base"')
    # 3 NG photos, all boxed exactly by the tuned model: 3/3 at IoU 0.5, Wilson [43.9%, 100%]
    assert '100.0% <span class="muted">(3/3)</span><small>[43.9%–100.0%]</small>' in tuned
    assert "1.00" in tuned and '0.00 <span class="muted">(0/3)</span>' in tuned  # mean IoU; no false alarm
    # the base's whole-photo box: IoU 306 / 1536 < 0.3; its centre (24, 16) misses the true box; 3 false alarms
    assert '0.0% <span class="muted">(0/3)</span>' in base and '1.00 <span class="muted">(3/3)</span>' in base
    assert 'data-type="spot"' in html and "no box" in html and "false alarm" in html


def test_localization_not_measured_says_why(tmp_path: Path):
    results = make_results(LABELS, BASE_P, TUNED_P, with_answers=5)
    results["localization"] = loc.localization_results([], {}, {}, loc.NO_BOXED_NG)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    html = write_report(path, tmp_path / "report.html").read_text(encoding="utf-8")
    assert f"Localization was not measured: {loc.NO_BOXED_NG}" in html and 'id="localization-table"' not in html
    assert summarize(html).viewboxes == []  # a version-1 file has no photo sizes: nothing is drawn


@pytest.mark.skipif(
    not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None, reason="Debian chromium not installed"
)
def test_boxes_are_painted_over_the_photos_in_headless_chromium(located_file: Path, tmp_path: Path):
    report = write_report(located_file, tmp_path / "report.html")
    done = chromium("--dump-dom", report.resolve().as_uri(), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = summarize(done.stdout)
    assert sorted(who for who, _ in dom.boxes["img03"]) == ["base", "truth", "tuned"]
    shot = tmp_path / "wide.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1200,6000", "--hide-scrollbars", report.resolve().as_uri(),
                    tmp_path=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(shot) as im:
        truth = tuple(int(TRUTH_COLOR[i : i + 2], 16) for i in (1, 3, 5))
        painted = sum(n for n, rgb in im.convert("RGB").getcolors(maxcolors=1_000_000) if rgb == truth)
    # The legend's key alone is ~50 px; two true boxes scaled up from 48 px photos to ~270 px cards are far more.
    assert painted > 400, painted

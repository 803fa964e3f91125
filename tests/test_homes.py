"""One home per concept: the model settings travel whole to every model a verb loads, what a run learned comes
from the run (not from a dataset that may be gone), and a model folder we write keeps the base's other files.

Each test here failed on the main of 2026-12-04 (e5f6d21), where these settings were passed by hand at six
call sites and the merged folder was rebuilt from what the processor saves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_spot_dataset
from helpers import make_run
from vlm_inspect.config import EvaluateConfig, MergeConfig, ModelSettings, WatchConfig
from vlm_inspect.evaluate import evaluate
from vlm_inspect.inference import Predictor
from vlm_inspect.merge import merge
from vlm_inspect.watch import watch

BUDGET = 32  # image tokens: a 448 × 336 photo is seen at ~226 × 170 px instead of its full size


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos large enough that the image-token budget changes what a dynamic-resolution model sees."""
    return write_spot_dataset(tmp_path_factory.mktemp("data") / "large", n=4, size=(448, 336))


@pytest.fixture(scope="module")
def qwen_run(tiny_model, large_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2.5-VL run at a small image budget, as `train` would save it."""
    folder = tmp_path_factory.mktemp("runs") / "qwen"
    return make_run(folder, tiny_model("qwen2_5_vl"), large_photos, image_max_tokens=BUDGET)


@pytest.fixture
def loads(monkeypatch) -> list[ModelSettings]:
    """The model settings of every Predictor.load in the test, in order."""
    seen: list[ModelSettings] = []
    real = Predictor.load.__func__

    def spy(cls, settings):
        seen.append(settings.model_settings())
        return real(cls, settings)

    monkeypatch.setattr(Predictor, "load", classmethod(spy))
    return seen


def test_evaluate_compare_scores_with_the_verbs_precision_and_image_budget(
    tiny_model, qwen_run: Path, large_photos: Path, tmp_path: Path, loads: list
):
    base = tiny_model("qwen2_5_vl")
    cfg = EvaluateConfig(
        model=str(base),
        adapter=str(qwen_run),
        data=str(large_photos),
        out=str(tmp_path / "report"),
        device="cpu",
        precision="fp32",
        image_max_tokens=48,  # not the run's 32: every model compared must see photos at this budget
        compare=[f"{base},{qwen_run}"],
        gallery_size=0,
    )
    evaluate(cfg)
    assert [(s.precision, s.image_max_tokens, s.device) for s in loads] == [("fp32", 48, "cpu")] * 2
    rows = json.loads((tmp_path / "report" / "results.json").read_text())["comparison"]
    assert rows[2]["key"] == "compare-1" and rows[2]["view"]["photo"] == rows[0]["view"]["photo"]


@pytest.mark.integration  # seconds: CI runs it, the unit loop leaves it out
def test_a_merged_model_and_its_base_see_photos_at_the_runs_budget(
    tiny_model, qwen_run: Path, large_photos: Path, tmp_path: Path, loads: list
):
    base = tiny_model("qwen2_5_vl")
    merged = merge(MergeConfig(model=str(base), adapter=str(qwen_run), out=str(tmp_path / "merged"), dtype="fp32"))
    cfg = EvaluateConfig(
        model=str(merged), base=str(base), data=str(large_photos), out=str(tmp_path / "report"), device="cpu"
    )
    evaluate(cfg)
    assert [s.image_max_tokens for s in loads] == [None, BUDGET]  # the base gets the merged model's, resolved
    models = json.loads((tmp_path / "report" / "results.json").read_text())["models"]
    assert models["base"]["view"]["photo"] == models["tuned"]["view"]["photo"]
    assert models["tuned"]["view"]["photo"]["seen_width"] < 448


def test_watch_loads_the_model_with_its_precision_and_image_budget(
    tiny_model, qwen_run: Path, tmp_path: Path, loads: list
):
    hot = tmp_path / "hot"
    hot.mkdir()
    Image.new("RGB", (448, 336), "white").save(hot / "a.png")
    cfg = WatchConfig(
        folder=str(hot),
        model=str(tiny_model("qwen2_5_vl")),
        adapter=str(qwen_run),
        station=str(tmp_path / "station"),
        precision="fp32",
        image_max_tokens=48,
        device="cpu",
        once=True,
        poll_s=0.01,
    )
    watch(cfg)
    assert [(s.precision, s.image_max_tokens) for s in loads] == [("fp32", 48)]


def test_language_and_product_come_from_the_run_even_when_its_dataset_is_gone(tiny_model_dir: Path, tmp_path: Path):
    data = write_spot_dataset(tmp_path / "zh-data", n=4, language="zh", product="纸箱")
    run = make_run(tmp_path / "run", tiny_model_dir, data)
    shutil.rmtree(data)  # the serving machine has the run, not the training data
    predictor = Predictor.load(ModelSettings(model=str(tiny_model_dir), adapter=str(run), device="cpu"))
    assert "纸箱" in predictor.default_question and "OK" in predictor.default_question
    assert predictor.default_question.startswith("这个")


def test_merge_keeps_the_base_files_it_does_not_rewrite(tiny_model, tmp_path: Path, large_photos: Path):
    """A processor loaded without torchvision saves no video processor; the merged Qwen folder must still carry the
    base's, or plain `AutoProcessor` (and vLLM) cannot load it elsewhere."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model("qwen2_5_vl"), base)
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2}
    (base / "video_preprocessor_config.json").write_text(json.dumps(video))
    (base / "LICENSE").write_text("Apache-2.0, as the base")
    run = make_run(tmp_path / "run", base, large_photos, image_max_tokens=BUDGET)
    merged = merge(MergeConfig(model=str(base), adapter=str(run), out=str(tmp_path / "merged"), dtype="fp32"))
    for name in ("video_preprocessor_config.json", "LICENSE"):
        assert (merged / name).read_bytes() == (base / name).read_bytes(), name
    assert (merged / "train_config.yaml").is_file() and (merged / "train_dataset.json").is_file()
    assert not list(merged.glob("adapter*"))

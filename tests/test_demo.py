"""`vlm-inspect demo --fast`: the whole pipeline end to end through the real verbs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlm_inspect.cli import app
from vlm_inspect.demo import FAST


@pytest.mark.integration
def test_demo_fast_runs_prepare_train_evaluate(tmp_path: Path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--fast", "--out", str(out)])
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    assert shown.count("ROC AUC") == 1 and shown.count("report: ") == 1  # the results and the report, once each
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["data"]["n_images"] == FAST.test_ok + FAST.test_ng
    assert set(results["metrics"]) == {"base", "tuned"}
    q = next(q["id"] for q in results["questions"] if q["default"])
    # the tuned model inspects better than the base on held-out photos (measured: 50% → 83.3% balanced accuracy)
    base = results["metrics"]["base"][q]["balanced_accuracy"]["value"]
    tuned = results["metrics"]["tuned"][q]["balanced_accuracy"]["value"]
    assert tuned >= base + 0.15, (base, tuned)
    base_stage = [json.loads(line) for line in (out / "base-run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in base_stage) == FAST.caption_steps
    captions = json.loads((out / "captions" / "train.json").read_text())
    assert not any(w in turn["value"] for s in captions for turn in s["conversations"] for w in ("OK", "NG"))
    for path in (
        "report/report.html",
        "run/adapter/adapter_config.json",
        "vision-model/config.json",
        "base-model/config.json",
        "dataset/manifest.json",
        "config.yaml",
    ):
        assert (out / path).exists(), path
    again = CliRunner().invoke(app, ["demo", "--fast", "--out", str(out)])  # never overwrites without --overwrite
    assert again.exit_code == 1 and "exists" in again.output


def test_tower_patch_targets_move_with_the_photo():
    """The tower stage rolls photos by a few pixels; each patch target must follow its mark the same way."""
    import numpy as np
    import torch
    from transformers import CLIPVisionConfig

    from vlm_inspect.demo import _patch_targets

    config = CLIPVisionConfig(image_size=96, patch_size=12)  # 8 × 8 patches of a 128 px photo: 16 px each
    mark = np.zeros((128, 128), np.float32)
    mark[20:28, 36:44] = 1.0  # patch (row 1, col 2), 8 px from its right and bottom edges
    grid = [_patch_targets([mark, None], config, dy, dx).reshape(2, 8, 8) for dy, dx in [(0, 0), (16, 0), (4, 8)]]
    assert [tuple(map(tuple, torch.nonzero(g[0]).tolist())) for g in grid] == [((1, 2),), ((2, 2),), ((1, 2), (1, 3))]
    assert all(g[1].sum() == 0 for g in grid)  # a clean box has no target anywhere, however moved
    # torch.roll moves the photo the same way np.roll moves the coverage: down and right for positive shifts
    photo = torch.from_numpy(mark)[None]
    assert torch.equal(torch.roll(photo, (16, 0), dims=(1, 2))[0], torch.from_numpy(np.roll(mark, (16, 0), (0, 1))))


def test_demo_summary_adds_times_not_a_second_results_table(tmp_path: Path, capsys: pytest.CaptureFixture):
    from vlm_inspect.demo import _print_summary

    _print_summary(tmp_path, {"photos": 1.0, "evaluate": 2.0})  # evaluate has printed the results table
    out = capsys.readouterr().out
    assert "total" in out and "ROC AUC" not in out and "accuracy" not in out

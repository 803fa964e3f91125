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
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["data"]["n_images"] == FAST.test_ok + FAST.test_ng
    assert set(results["metrics"]) == {"base", "tuned"}
    q = next(q["id"] for q in results["questions"] if q["default"])
    # the tuned model inspects better than the base on held-out photos (measured: 50% → 81.7% balanced accuracy)
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

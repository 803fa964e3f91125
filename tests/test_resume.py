"""`train --resume`: a kill at any point leaves a run to resume, and a resume never mixes settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import Trainer

from conftest import write_spot_dataset
from vlm_inspect.config import TrainConfig
from vlm_inspect.errors import ConfigError, OutputExistsError
from vlm_inspect.folders import RunFolder
from vlm_inspect.train import train
from vlm_inspect.training.checkpoints import changed_settings, rotate

TINY = {"lora_r": 4, "lora_alpha": 8, "lr": 1e-2, "lora_dropout": 0.0, "augment": False}


def _cfg(model: Path, data: Path, run: Path, **extra) -> TrainConfig:
    return TrainConfig(model=str(model), data=str(data), out=str(run), **{**TINY, **extra})


def _steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.integration
def test_a_kill_between_saving_and_marking_a_checkpoint_keeps_the_last_complete_one(
    tmp_path: Path, tiny_model_dir: Path, spot_dataset: Path, monkeypatch: pytest.MonkeyPatch
):
    """save_total_limit=1: the Trainer used to delete checkpoint-1 before checkpoint-2 was marked complete."""
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, spot_dataset, run, min_steps=4, save_fraction=0.25, save_total_limit=1)
    real_save = Trainer._save_checkpoint

    def save_then_die(self, model, trial):
        real_save(self, model, trial)
        if self.state.global_step == 2:
            raise KeyboardInterrupt  # the process dies with checkpoint-2 written but not yet marked

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    assert [p.name for p in RunFolder(run).complete_checkpoints()] == ["checkpoint-1"]
    config_before = (run / "config.yaml").read_bytes()
    train(_cfg(tiny_model_dir, spot_dataset, run, min_steps=4, save_fraction=0.25, save_total_limit=1, resume=True))
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert _steps(run) == [1, 2, 3, 4]  # resumed from step 1, not from 0
    assert [p.name for p in RunFolder(run).checkpoints()] == ["checkpoint-4"]  # the limit still holds
    assert (run / "config.yaml").read_bytes() == config_before


def test_resume_with_changed_settings_is_refused_listing_each(tmp_path: Path, tiny_model_dir: Path, spot_dataset: Path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = _cfg(tiny_model_dir, spot_dataset, run, min_steps=2)
    from vlm_inspect.config import save_config

    save_config(cfg, run)
    before = (run / "config.yaml").read_bytes()
    other_data = write_spot_dataset(tmp_path / "other")
    changed = _cfg(tiny_model_dir, other_data, run, min_steps=2, lr=1e-3, lora_r=8, resume=True)
    with pytest.raises(ConfigError) as err:
        train(changed)
    problems = "\n".join(err.value.problems)
    for name in ("lr:", "lora_r:", "data:"):
        assert name in problems
    assert (run / "config.yaml").read_bytes() == before
    # settings that change nothing about the run may differ
    safe = _cfg(tiny_model_dir, spot_dataset, run, min_steps=2, logging_steps=5, report_to="none", resume=True)
    assert changed_settings(cfg, safe) == []


def test_resume_without_a_complete_checkpoint_is_refused(tmp_path: Path, tiny_model_dir: Path, spot_dataset: Path):
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-3").mkdir(parents=True)  # killed while writing its first checkpoint
    cfg = _cfg(tiny_model_dir, spot_dataset, run, min_steps=2)
    from vlm_inspect.config import save_config

    save_config(cfg, run)
    with pytest.raises(OutputExistsError, match="no complete checkpoint"):
        train(_cfg(tiny_model_dir, spot_dataset, run, min_steps=2, resume=True))
    with pytest.raises(OutputExistsError, match="no run to resume"):
        train(_cfg(tiny_model_dir, spot_dataset, tmp_path / "never-started", resume=True))


def test_rotation_deletes_only_behind_the_newest_complete_checkpoint(tmp_path: Path):
    folders = {step: tmp_path / "checkpoints" / f"checkpoint-{step}" for step in (2, 4, 6)}
    for step, folder in folders.items():
        folder.mkdir(parents=True)
        if step < 6:
            (folder / RunFolder.COMPLETE).write_text(str(step))
    rotate(RunFolder(tmp_path), keep=1)
    assert [p.name for p in RunFolder(tmp_path).checkpoints()] == [
        "checkpoint-4",
        "checkpoint-6",
    ]  # 6 is not complete yet
    (folders[6] / RunFolder.COMPLETE).write_text("6")
    rotate(RunFolder(tmp_path), keep=1)
    assert [p.name for p in RunFolder(tmp_path).checkpoints()] == ["checkpoint-6"]

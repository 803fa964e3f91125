"""Checkpoints a kill cannot take away, and `--resume` only with the settings the run started with.

The Trainer's own rotation deletes old checkpoints before the new one is known to be complete, so
a kill at that moment left no complete checkpoint (with `save_total_limit=1`) and `--resume`
silently started again from step 0. Here the marker is written first, then older checkpoints go:
at every instant the newest complete checkpoint is on disk.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from vlm_inspect.config import TrainConfig
from vlm_inspect.errors import ConfigError, OutputExistsError
from vlm_inspect.folders import RunFolder, checkpoint_step
from vlm_inspect.outputs import remove_tree

SAFE_TO_CHANGE = ("logging_steps", "report_to", "num_workers", "gpus", "compile", "resume", "overwrite")
"""Settings a resumed run may change: they alter neither the data, the model nor the optimizer's path."""
PATH_SETTINGS = ("model", "data", "out")


def rotate(run: RunFolder, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and unfinished ones older than those."""
    complete = run.complete_checkpoints()
    if not complete:
        return
    kept = complete[-max(1, keep) :]
    for folder in run.checkpoints():
        if folder not in kept and checkpoint_step(folder) < checkpoint_step(kept[-1]):
            with_marker_first(folder)


def with_marker_first(folder: Path) -> None:
    """Remove a checkpoint: its completion marker first, so a kill midway leaves no 'complete' half."""
    (folder / RunFolder.COMPLETE).unlink(missing_ok=True)
    remove_tree(folder)


class CompleteThenRotate(TrainerCallback):
    """After every save: mark the checkpoint complete, then rotate (the Trainer's own rotation is off)."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / RunFolder.COMPLETE).write_text(str(state.global_step))
            rotate(RunFolder(folder.parent.parent), self.keep)


def resume_point(run: RunFolder) -> Path:
    """The newest complete checkpoint; unfinished ones after it are removed (they would be rewritten).

    Raises:
        OutputExistsError: no checkpoint of the run is complete.
    """
    latest = run.latest_complete_checkpoint()
    if latest is None:
        folders = run.checkpoints()
        unfinished = f" ({len(folders)} unfinished)" if folders else ""
        raise OutputExistsError(
            f"{run.path}: no complete checkpoint to resume from{unfinished}; the run stopped before its first "
            "checkpoint was written: start it again with --overwrite"
        )
    for folder in run.checkpoints():
        if checkpoint_step(folder) > checkpoint_step(latest):
            with_marker_first(folder)
    return latest


def changed_settings(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """'name: saved → wanted' for every setting a resume may not change."""
    changes = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in SAFE_TO_CHANGE:
            continue
        before, after = getattr(saved, f.name), getattr(wanted, f.name)
        if before == after:
            continue
        if f.name in PATH_SETTINGS and before and after and Path(before).resolve() == Path(after).resolve():
            continue
        changes.append(f"{f.name}: the run has {before!r}, this command gives {after!r}")
    return changes


def check_resume(cfg: TrainConfig, run: RunFolder) -> Path:
    """Refuse a resume that would mix settings or start from nothing; return the checkpoint to resume from.

    Raises:
        ConfigError: settings differ from the run's config.yaml (each difference listed), or it is missing.
        OutputExistsError: no checkpoint of the run is complete.
    """
    if not run.config_path.is_file():
        raise ConfigError(
            [f"{run.config_path}: missing; {run.path} is not a run folder to resume (drop --resume to start one)"]
        )
    changes = changed_settings(run.config(), cfg)
    if changes:
        allowed = ", ".join(SAFE_TO_CHANGE[:-2])
        raise ConfigError(
            [
                *changes,
                f"resume continues a run with the settings it started with (only {allowed} may change); "
                "drop the changed settings, or start a new run in another --out",
            ]
        )
    return resume_point(run)

"""Output folders: `--overwrite` replaces only what vlm-inspect made, and a kill never leaves neither."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_spot_dataset
from vlm_inspect.cli import app
from vlm_inspect.errors import OutputExistsError
from vlm_inspect.outputs import (
    MARKER,
    check_replaceable,
    file_replace_problems,
    mark,
    settle_leftovers,
    staged_output,
)

runner = CliRunner()


def _foreign(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    return folder


def test_train_overwrite_of_the_working_directory_deletes_nothing(tmp_path: Path, monkeypatch, tiny_model_dir: Path):
    work = _foreign(tmp_path / "work")
    write_spot_dataset(work / "ds")
    monkeypatch.chdir(work)
    missing = runner.invoke(app, ["train", "--model", "/nonexistent", "--data", "ds", "--out", ".", "--overwrite"])
    assert missing.exit_code == 1 and "/nonexistent" in missing.output
    real = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--data", "ds", "--out", ".", "--overwrite"])
    assert real.exit_code == 1 and "working directory" in " ".join(real.output.split())
    assert (work / "thesis.tex").read_text() == "years of work" and (work / "ds").is_dir()


@pytest.mark.parametrize("where", ["foreign", "home", "holds-input", "file"])
def test_overwrite_refuses_what_vlm_inspect_did_not_make(where: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = _foreign(tmp_path / ("home" if where == "home" else "out")) if where != "file" else tmp_path / "out"
    if where == "file":
        out.write_text("not a folder")
    mark(out, "EvaluateConfig") if where in ("home", "holds-input") else None
    inputs = [out / "photos"] if where == "holds-input" else []
    with pytest.raises(OutputExistsError, match="--overwrite refused"):
        check_replaceable(out, True, inputs)
    assert out.exists()
    if out.is_dir():
        assert (out / "thesis.tex").exists()


def test_a_folder_we_made_is_replaced_whole(tmp_path: Path):
    out = tmp_path / "report"
    with staged_output(out, False, "EvaluateConfig") as tmp:
        (tmp / "results.json").write_text("old")
        (tmp / "config.yaml").write_text("kind: EvaluateConfig\n")
    with staged_output(out, True, "EvaluateConfig") as tmp:
        (tmp / "results.json").write_text("new")
    assert (out / "results.json").read_text() == "new" and not (out / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_a_failed_build_leaves_the_old_output_and_no_partial(tmp_path: Path):
    out = tmp_path / "report"
    with staged_output(out, False, "EvaluateConfig") as tmp:
        (tmp / "results.json").write_text("old")
        (tmp / "config.yaml").write_text("kind: EvaluateConfig\n")
    with pytest.raises(KeyboardInterrupt), staged_output(out, True, "EvaluateConfig") as tmp:
        (tmp / "results.json").write_text("half")
        raise KeyboardInterrupt
    assert (out / "results.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


_KILLED = r"""
import os, signal, sys
from pathlib import Path
from vlm_inspect import outputs
out, point = Path(sys.argv[1]), sys.argv[2]
def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "between-renames":
    real = outputs.set_aside
    outputs.set_aside = lambda out: (real(out), die())
with outputs.staged_output(out, True, "EvaluateConfig") as tmp:
    (tmp / "results.json").write_text("new")
    (tmp / "config.yaml").write_text("kind: EvaluateConfig\n")
    if point == "building":
        die()
"""


@pytest.mark.parametrize("point", ["building", "between-renames"])
def test_a_killed_overwrite_leaves_the_old_output_or_the_new(point: str, tmp_path: Path):
    out = tmp_path / "report"
    with staged_output(out, False, "EvaluateConfig") as tmp:
        (tmp / "results.json").write_text("old")
        (tmp / "config.yaml").write_text("kind: EvaluateConfig\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(out), point], env=env, check=False)
    assert killed.returncode == -9
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "report"]
    assert leftovers and all(name.startswith(".report.") for name in leftovers)  # hidden, named after out
    settle_leftovers(out)  # what the next run writing `out` does first
    assert (out / "results.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_a_live_writer_is_not_disturbed_but_a_reused_process_id_is_no_writer(tmp_path: Path):
    from vlm_inspect.outputs import _started

    out = tmp_path / "report"
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        partial = tmp_path / f".report.partial-{writer.pid}"
        partial.mkdir()
        (partial / MARKER).write_text(f"EvaluateConfig\n{_started(writer.pid)}\n")
        with pytest.raises(OutputExistsError, match=f"process {writer.pid} is writing it"):
            settle_leftovers(out)
        assert partial.exists()
        (partial / MARKER).write_text("EvaluateConfig\n1\n")  # left by an earlier process with the same id
        settle_leftovers(out)
        assert not partial.exists()
    finally:
        writer.kill()
        writer.wait()


def test_predict_overwrites_only_a_predictions_file(tmp_path: Path):
    ours = tmp_path / "p.csv"
    ours.write_text("path,verdict,p_ng\n")
    theirs = tmp_path / "budget.csv"
    theirs.write_text("month,spend\n")
    assert file_replace_problems(ours, True, [], ('{"path"', "path,verdict")) == []
    assert "exists" in file_replace_problems(ours, False, [], ("path,verdict",))[0]
    assert "does not look like" in file_replace_problems(theirs, True, [], ("path,verdict",))[0]
    assert "an input" in file_replace_problems(ours, True, [ours], ("path,verdict",))[0]


def test_prepare_and_predict_overwrite_nothing_they_did_not_make(tmp_path: Path, tiny_model_dir: Path):
    from vlm_inspect.data.synthetic import write_dataset_folders

    photos = write_dataset_folders(tmp_path / "photos", 4, 4, seed=0, size=32)
    notes = _foreign(tmp_path / "notes")
    prepared = runner.invoke(app, ["prepare", str(photos), "--out", str(notes), "--overwrite"])
    assert prepared.exit_code == 1 and "did not make it" in " ".join(prepared.output.split())
    budget = tmp_path / "budget.csv"
    budget.write_text("month,spend\n")
    args = ["predict", str(photos), "--model", str(tiny_model_dir), "--out", str(budget), "--overwrite"]
    predicted = runner.invoke(app, args)
    assert predicted.exit_code == 1 and "does not look like" in " ".join(predicted.output.split())
    assert sorted(p.name for p in notes.iterdir()) == ["thesis.tex"] and budget.read_text() == "month,spend\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budget.csv", "notes", "photos"]

"""Output folders every verb writes: staged beside the target, swapped in whole, replaced only when ours.

A verb builds its output in a hidden sibling `.OUT.partial-PID` and renames it to `OUT` only when it is
complete; an existing `OUT` is first renamed to `.OUT.old-PID` and deleted after the new one is in place.
A kill therefore leaves the old output or the new one at `OUT`, never a half-written one; the siblings
it leaves are found and settled by the next run that writes `OUT` (`settle_leftovers`).

`--overwrite` replaces only what vlm-inspect made: a folder holding the `config.yaml` one of our verbs
writes (or, while it is built or set aside, the `.vlm-inspect` marker), never the working directory, the home folder,
`/`, an input or a folder holding one. Inputs are checked before any output is touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

from vlm_inspect.errors import ConfigError, OutputExistsError

MARKER = ".vlm-inspect"
"""File in the folders vlm-inspect is building or setting aside; finished ones are known by their config.yaml."""
_OUR_KINDS = {
    "PrepareConfig",
    "TrainConfig",
    "MergeConfig",
    "ConvertConfig",
    "EvaluateConfig",
    "DemoConfig",
    "ExportConfig",
}
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>partial|old)-(?P<pid>\d+)$")


def mark(folder: Path, kind: str) -> None:
    """Write the marker that says vlm-inspect made `folder`: the verb, and when this process started."""
    (folder / MARKER).write_text(f"{kind}\n{_started(os.getpid())}\n", encoding="utf-8")


def is_ours(folder: Path) -> bool:
    """Whether vlm-inspect made `folder`: its marker, or a config.yaml one of our verbs wrote."""
    if (folder / MARKER).is_file():
        return True
    config = folder / "config.yaml"
    try:
        kind = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("kind")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return False
    return kind in _OUR_KINDS


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_replaceable(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Raise OutputExistsError unless `out` is free, or `overwrite` is on and `out` may be replaced.

    Free: absent, or an empty folder. Replaceable: a folder vlm-inspect made that is not the working
    directory, the home folder, `/`, nor an input or a folder holding one.
    """
    out = Path(out)
    if out.is_symlink():
        raise OutputExistsError(f"{out}: is a symbolic link; pick a real folder for the output")
    if not out.exists() or is_empty_dir(out):
        return
    if not overwrite:
        raise OutputExistsError(f"{out}: already exists and is not empty; pick another output or pass --overwrite")
    problem = _why_not_replaceable(out, inputs)
    if problem:
        raise OutputExistsError(f"{out}: --overwrite refused: {problem}")


def _why_not_replaceable(out: Path, inputs: Iterable[str | Path | None]) -> str | None:
    target = out.resolve()
    protected = {Path("/"), Path.home().resolve(), Path.cwd().resolve()}
    if target in protected or target in Path.cwd().resolve().parents:
        return "it is the working directory, a folder above it, the home folder or /; name a folder of its own"
    for given in inputs:
        if not given:
            continue
        source = Path(given).resolve()
        if source == target or target in source.parents:
            return f"it holds the input {given}; write the output somewhere else"
    if not out.is_dir():
        return "it is a file, not a folder vlm-inspect made; remove it yourself or pick another output"
    if not is_ours(out):
        return (
            f"vlm-inspect did not make it (no {MARKER} file and no config.yaml of a vlm-inspect verb); "
            "remove it yourself or pick another output"
        )
    return None


def check_inputs_exist(inputs: dict[str, str | Path | None]) -> None:
    """Raise one ConfigError naming every input that does not exist: checked before any output is touched."""
    problems = [f"{name}: {path} does not exist" for name, path in inputs.items() if path and not Path(path).exists()]
    if problems:
        raise ConfigError(problems)


def check_not_inside_inputs(out: str | Path, inputs: Iterable[str | Path | None]) -> list[str]:
    """Problems for an output that is an input or sits inside one (writing it would change the input)."""
    target = Path(out).resolve()
    problems = []
    for given in inputs:
        if given and (Path(given).resolve() == target or Path(given).resolve() in target.parents):
            problems.append(f"out: {out} is inside the input {given}; write the output somewhere else")
    return problems


def file_replace_problems(
    out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None], starts: tuple[str, ...]
) -> list[str]:
    """Problems with writing the file `out`: it exists without overwrite, or is not a file we wrote.

    A file counts as ours when its first line starts with one of `starts` (our header or first field).
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return []
    if not overwrite:
        return [f"out: {out} exists; pass --overwrite to replace it"]
    if out.is_symlink() or not out.is_file():
        problem = "it is not a plain file (a folder, link or device)"
    elif any(Path(p).resolve() == out.resolve() for p in inputs if p):
        problem = "it is an input"
    elif not _first_line(out).startswith(starts):
        problem = "it does not look like a file vlm-inspect wrote; remove it yourself or pick another --out"
    else:
        return []
    return [f"out: {out}: --overwrite refused: {problem}"]


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline(4096)
    except (OSError, UnicodeDecodeError):
        return ""


# ------------------------------------------------------------------ leftovers of interrupted runs


def _started(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot (Linux); '' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of stat, counted after the command name


def _writer_alive(folder: Path, pid: int) -> bool:
    """Whether the process that left `folder` still runs (not merely another process that got its id)."""
    if pid == os.getpid():
        return False  # this process is not writing it: it is settling leftovers first
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        recorded = (folder / MARKER).read_text(encoding="utf-8").splitlines()[1]
    except (OSError, IndexError, UnicodeDecodeError):
        return True
    return not recorded or recorded == _started(pid)


def leftovers(out: Path) -> list[tuple[Path, str, int]]:
    """Siblings `.OUT.partial-PID` and `.OUT.old-PID` that runs writing `out` left: (path, kind, pid)."""
    if not out.parent.is_dir():
        return []
    found = []
    for sibling in out.parent.iterdir():
        match = _LEFTOVER.match(sibling.name)
        if match and match["name"] == out.name and sibling.is_dir() and not sibling.is_symlink():
            found.append((sibling, match["what"], int(match["pid"])))
    return found


def settle_leftovers(out: Path) -> list[str]:
    """Clean up after interrupted runs that wrote `out`; returns what was done, one line each.

    A partial build of a dead run is deleted. An old output set aside by a dead run is put back
    when `out` is missing (the kill fell between the two renames), else deleted (the new one is in).
    Refuses while a live process is writing `out`. Only folders holding our marker are touched.
    """
    done = []
    for path, what, pid in sorted(leftovers(out), key=lambda item: item[1]):  # "old" before "partial"
        if _writer_alive(path, pid):
            raise OutputExistsError(f"{out}: process {pid} is writing it ({path.name}); wait for it or stop it")
        if not is_ours(path):
            raise OutputExistsError(
                f"{path}: named like a vlm-inspect leftover but has no {MARKER} file; remove or rename it yourself"
            )
        if what == "old" and not out.exists():
            path.rename(out)
            (out / MARKER).unlink(missing_ok=True)
            done.append(f"{out}: put back the previous output an interrupted run had set aside")
        else:
            remove_tree(path)
            done.append(f"{path}: removed, left by an interrupted run (process {pid})")
    return done


def remove_tree(path: Path) -> None:
    """Delete a folder we made: marker first, so a kill midway leaves nothing that passes for ours."""
    with contextlib.suppress(FileNotFoundError):
        (path / MARKER).unlink()
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ staging and swapping


def partial_path(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def set_aside(out: Path) -> Path:
    """Rename an existing output to `.OUT.old-PID` (to delete once its replacement is complete)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.is_dir() and not is_ours(out):
        mark(out, "previous")
    out.rename(old)
    return old


def swap_in(new: Path, out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Move the complete folder `new` to `out`; an existing `out` is set aside first and deleted after."""
    (new / MARKER).unlink(missing_ok=True)  # from here on its config.yaml says it is ours
    if not out.exists() or is_empty_dir(out):
        if out.exists():
            out.rmdir()
        new.rename(out)
        return
    check_replaceable(out, overwrite, inputs)  # it may have appeared while we worked
    old = set_aside(out)
    new.rename(out)
    remove_tree(old)


@contextlib.contextmanager
def staged_output(
    out: str | Path, overwrite: bool, kind: str, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """A hidden sibling to build `out` in, swapped into place only if the block completes.

    Args:
        out: The output folder.
        overwrite: Whether an existing, replaceable `out` may be replaced.
        kind: The verb's config class name, written in the marker.
        inputs: The verb's input paths: `out` may not be, hold or sit in one.

    Raises:
        OutputExistsError: `out` exists and may not be replaced, or another process is writing it.
    """
    out = Path(out)
    inputs = list(inputs)
    check_replaceable(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    for line in settle_leftovers(out):
        print(line, flush=True)
    tmp = partial_path(out)
    tmp.mkdir()
    mark(tmp, kind)
    try:
        yield tmp
        swap_in(tmp, out, overwrite, inputs)
    except BaseException:
        remove_tree(tmp)
        raise

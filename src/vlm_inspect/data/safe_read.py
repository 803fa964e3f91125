"""Reading what a user names without leaving it: containment, odd files, odd names and hostile JSON.

`prepare` opens nothing outside the source folders it is given: a link (file, sidecar or folder)
that resolves outside them, and a LLaVA `image` path that climbs out (`../`) or is absolute, are
refused with a reason instead of being read. Listing a folder reports what it cannot use (dangling
links, FIFOs, sockets, devices, unreadable subfolders) instead of passing over it in silence. Names
that are not UTF-8 (GBK names from Windows zips) are shown with `\\xNN` escapes, and JSON that is
nested 100,000 deep or holds a 5,000-digit number is a `DataError`, not a traceback. A name that goes on a
console is shown with its control characters escaped (`printable`), and a name made from one that may be too
long for the file system is shortened to fit (`fit_file_name`).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from vlm_inspect.errors import DataError

MAX_SIDECAR_BYTES = 1024**2
"""Sidecar files (`<stem>.txt`, `<stem>.json`) larger than this are refused before they are read."""
MAX_NAME_BYTES = 255
"""The longest file name (one path component) Linux, macOS and Windows file systems take, in bytes."""
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {
    0x0D: "\\r",
    0x0A: "\\n",
    0x09: "\\t",
}


def show_path(path: str | Path) -> str:
    """A path as printable text: bytes that are not UTF-8 (a GBK name from a Windows zip) become `\\\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def printable(path: str | Path) -> str:
    """A name as one line of console text: `show_path`, with carriage returns, newlines and other control
    characters shown as `\\r`, `\\n`, `\\xNN` (a CR in a photo's name would otherwise overwrite the line)."""
    return show_path(path).translate(_CONTROL)


def fit_file_name(stem: str, rest: str = "", max_bytes: int = MAX_NAME_BYTES) -> str:
    """`stem + rest` as one file name of at most `max_bytes` UTF-8 bytes: the stem shortened, whole characters at a
    time, when the whole would not fit (a 251-byte photo name plus `-1` or `.result.json`)."""
    while stem and len(os.fsencode(stem + rest)) > max_bytes:
        stem = stem[:-1]
    return stem + rest


def outside_reason(path: Path, root: Path) -> str | None:
    """Why `path` may not be opened as part of the source folder `root`, or None when it may.

    The path is resolved (links followed) and must land inside the resolved `root`.
    """
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        return "dangling link (its target does not exist)" if _is_link(path) else "no such file"
    except (OSError, RuntimeError) as err:  # a link loop, a name too long
        return f"cannot be resolved ({getattr(err, 'strerror', None) or err})"
    base = root.resolve()
    if real == base or base in real.parents:
        return None
    if Path(os.path.normpath(path.absolute())).is_relative_to(base):
        return f"links outside the source {show_path(root)} (to {show_path(real)}); only files inside it are read"
    return f"is outside the source {show_path(root)} (an absolute or ../ path); only files inside it are read"


def _is_link(path: Path) -> bool:
    try:
        return path.is_symlink()
    except OSError:
        return False


def list_folder(folder: Path, root: Path) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
    """(files, subfolders, refused) directly in `folder`, sorted; hidden entries are left out.

    Refused, each with its reason: links leading outside `root` or nowhere, FIFOs, sockets and
    devices, entries that cannot be looked at, and `folder` itself when it cannot be listed.
    """
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        return [], [], [(folder, f"folder cannot be read ({err.strerror or err}); its photos are left out")]
    files, folders, refused = [], [], []
    for name in names:
        if name.startswith("."):
            continue
        path = folder / name
        reason = outside_reason(path, root) if _is_link(path) else None
        if reason:
            refused.append((path, reason))
            continue
        try:
            mode = path.stat().st_mode
        except OSError as err:
            refused.append((path, f"cannot be read ({err.strerror or err})"))
            continue
        if stat.S_ISDIR(mode):
            folders.append(path)
        elif stat.S_ISREG(mode):
            files.append(path)
        else:
            refused.append((path, "not a regular file (a FIFO, socket or device), so it is not read"))
    return files, folders, refused


def walk_files(folder: Path, root: Path, recursive: bool) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Regular files under `folder` (in subfolders too when `recursive`) and what was refused, with reasons.

    A folder reached twice through links is read once.
    """
    files, refused = [], []
    pending, seen = [folder], set()
    while pending:
        current = pending.pop()
        real = current.resolve()
        if real in seen:
            continue
        seen.add(real)
        found, subfolders, current_refused = list_folder(current, root)
        files += found
        refused += current_refused
        if recursive:
            pending += reversed(subfolders)
    return sorted(files), refused


def is_regular_file(path: Path) -> bool:
    """Whether `path` is a regular file (links followed); False for names the system refuses (too long)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def exists(path: Path) -> bool:
    """Whether anything (a dangling link too) is at `path`; False for a name the system refuses (too long)."""
    return os.path.lexists(path)


def read_sidecar(path: Path, root: Path) -> bytes:
    """The bytes of a sidecar inside `root`, refused when it is not safe to read.

    Raises:
        DataError: `"{path}: <reason>"` for a link out of `root`, a FIFO or device, an unreadable
            or oversized file.
    """
    name = show_path(path)
    reason = outside_reason(path, root)
    if reason:
        raise DataError(f"{name}: {reason}")
    if not is_regular_file(path):
        raise DataError(f"{name}: not a regular file (a FIFO, socket or device), so it is not read")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SIDECAR_BYTES + 1)
    except OSError as err:
        raise DataError(f"{name}: cannot be read ({err.strerror or err})") from None
    if len(data) > MAX_SIDECAR_BYTES:
        raise DataError(f"{name}: larger than the {MAX_SIDECAR_BYTES:,}-byte limit for a sidecar")
    return data


def parse_json(text: str | bytes, name: str) -> Any:
    """UTF-8 JSON parsed, or a `DataError` naming `name` for bad, too deeply nested or too long-numbered JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{name}: JSON nested too deeply to read") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, integers over Python's 4,300-digit limit
        raise DataError(f"{name}: not valid UTF-8 JSON ({_short(err)})") from None


def _short(err: Exception) -> str:
    text = str(err)
    return text if len(text) <= 200 else text[:200] + "..."

"""`vlm-inspect export`: reviewed records out as class folders that `vlm-inspect prepare` reads.

Layout: `ok/<stem>.<ext>`, `ng/<defect type>/<stem>.<ext>` (or `ng/` when no type was given), each
with a `<stem>.json` sidecar `{"description": ..., "defects": [{"type": ..., "box": [x0, y0, x1, y1]}]}`
holding the operator's description and boxes. Only reviewed records go out, with their latest review;
the folder is built beside `out` and renamed into place, so a crash never leaves half an export.

Nothing goes out under a label it was not reviewed with: each photo is read from the store and checked against
its record's content hash, and a record whose photo is missing, is not a regular file inside the photo folder or
was changed since, or whose sidecar `prepare` would refuse, is a skipped row (printed, and listed in
`export.json`) naming the record and the reason. The store is only read: a read-only station can be exported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vlm_inspect.config import ExportConfig, require, save_config
from vlm_inspect.data.safe_read import MAX_NAME_BYTES, MAX_SIDECAR_BYTES, fit_file_name, printable
from vlm_inspect.errors import ConfigError, StationError
from vlm_inspect.outputs import check_replaceable, staged_output
from vlm_inspect.station.history import HistoryFilter, all_records
from vlm_inspect.station.store import StationStore, open_store

SUMMARY = "export.json"
"""Beside the class folders: how many records went out, and each one skipped with its reason."""
_STEM_BYTES = MAX_NAME_BYTES - len(".json")
"""A photo's or sidecar's name without its suffix (.json, .webp and the others are at most 5 bytes)."""
console = Console()


def export(cfg: ExportConfig) -> Path:
    """Write the station's reviewed records as training class folders; the output folder.

    Raises:
        ConfigError: station or out missing.
        OutputExistsError: out exists, is not empty, and overwrite is off.
        StationError: no station there, the store cannot be read, or nothing is reviewed yet.
    """
    problems = require(cfg, "station", "out")
    if problems:
        raise ConfigError(problems)
    out = Path(cfg.out)
    check_replaceable(out, cfg.overwrite)  # before the store is opened: a refusal comes at once
    store = open_store(cfg.station, cfg.db, create=False, write=False)
    try:
        records = all_records(store, HistoryFilter(review="reviewed"))
        if not records:
            raise StationError(f"{store.where}: no reviewed record to export yet (review or label some photos first)")
        with staged_output(out, True, "ExportConfig") as tmp:
            skipped = write_class_folders(store, records, tmp)
            _write_summary(tmp, len(records) - len(skipped), skipped)
            save_config(cfg, tmp)  # marks the folder as export's own, so --overwrite may replace it
    finally:
        store.close()
    _print_summary(records, skipped, out)
    return out


def write_class_folders(store: StationStore, records: list[dict], folder: Path) -> list[dict]:
    """One photo (and sidecar when there is something to say) per record under `folder`; the records skipped."""
    skipped = []
    for record in records:
        try:
            _write_record(store, record, folder)
        except StationError as err:
            skipped.append({"record_id": record["id"], "file": record["file"], "reason": str(err)})
            shown = f"record {record['id']} ({printable(record['file'])}): {printable(str(err))}"
            console.print(f"[yellow]skipped[/] {escape(shown)}", highlight=False)
    return skipped


def _write_record(store: StationStore, record: dict, folder: Path) -> None:
    review = record["latest_review"]
    sidecar = _sidecar(review)
    text = json.dumps(sidecar, ensure_ascii=False, indent=2) + "\n" if sidecar else ""
    if len(text.encode("utf-8")) > MAX_SIDECAR_BYTES:
        raise StationError(
            f"its review's sidecar would be {len(text.encode('utf-8')):,} bytes ({len(review['boxes']):,} boxes), "
            f"more than the {MAX_SIDECAR_BYTES:,} bytes prepare reads"
        )
    data = store.read_photo(record["photo_sha256"], record["photo_suffix"])  # checked against its hash
    verdict = review["verdict"]
    kind = _folder_name(review["defect_type"]) if verdict == "NG" and review["defect_type"] else None
    target = folder / verdict.lower() / (kind or "")
    target.mkdir(parents=True, exist_ok=True)
    stem = fit_file_name(_folder_name(Path(record["file"]).stem) or "photo", f"-{record['id']}", _STEM_BYTES)
    (target / f"{stem}{record['photo_suffix']}").write_bytes(data)
    if text:
        (target / f"{stem}.json").write_text(text, encoding="utf-8")


def _sidecar(review: dict) -> dict:
    sidecar: dict = {}
    if review["description"]:
        sidecar["description"] = review["description"]
    if review["verdict"] == "NG" and review["boxes"]:
        kind = review["defect_type"]
        sidecar["defects"] = [{"type": kind, "box": box} if kind else {"box": box} for box in review["boxes"]]
    return sidecar


def _write_summary(folder: Path, exported: int, skipped: list[dict]) -> None:
    body = {"exported": exported, "skipped": skipped}
    (folder / SUMMARY).write_text(json.dumps(body, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _print_summary(records: list[dict], skipped: list[dict], out: Path) -> None:
    gone = {row["record_id"] for row in skipped}
    written = [r for r in records if r["id"] not in gone]
    n_ng = sum(r["latest_review"]["verdict"] == "NG" for r in written)
    console.print(
        f"exported {len(written)} reviewed photo(s) ({len(written) - n_ng} OK, {n_ng} NG) to {escape(printable(out))}"
        + (f"; {len(skipped)} skipped (listed in {SUMMARY})" if skipped else ""),
        highlight=False,
    )
    console.print(f"next: vlm-inspect prepare {escape(printable(out))} --out DATASET", highlight=False)


def _folder_name(text: str) -> str:
    """A safe file or folder name: letters, digits (any script), dash, underscore and dot kept."""
    return re.sub(r"[^\w.-]+", "_", text.strip()).strip("._")

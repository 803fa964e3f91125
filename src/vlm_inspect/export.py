"""`vlm-inspect export`: reviewed records out as class folders that `vlm-inspect prepare` reads.

Layout: `ok/<stem>.<ext>`, `ng/<defect type>/<stem>.<ext>` (or `ng/` when no type was given), each
with a `<stem>.json` sidecar `{"description": ..., "defects": [{"type": ..., "box": [x0, y0, x1, y1]}]}`
holding the operator's description and boxes. Only reviewed records go out, with their latest review;
the folder is built beside `out` and renamed into place, so a crash never leaves half an export.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from rich.console import Console

from vlm_inspect.config import ExportConfig, require, save_config
from vlm_inspect.errors import ConfigError, StationError
from vlm_inspect.outputs import check_replaceable, staged_output
from vlm_inspect.station.history import HistoryFilter, all_records
from vlm_inspect.station.store import StationStore, open_store

console = Console()


def export(cfg: ExportConfig) -> Path:
    """Write the station's reviewed records as training class folders; the output folder.

    Raises:
        ConfigError: station or out missing.
        OutputExistsError: out exists, is not empty, and overwrite is off.
        StationError: the store cannot be read, a photo file is missing, or nothing is reviewed yet.
    """
    problems = require(cfg, "station", "out")
    if problems:
        raise ConfigError(problems)
    out = Path(cfg.out)
    check_replaceable(out, cfg.overwrite)  # before the store is opened: a refusal comes at once
    store = open_store(cfg.station, cfg.db)
    try:
        records = all_records(store, HistoryFilter(review="reviewed"))
        if not records:
            raise StationError(f"{store.where}: no reviewed record to export yet (review or label some photos first)")
        with staged_output(out, True, "ExportConfig") as tmp:
            write_class_folders(store, records, tmp)
            save_config(cfg, tmp)  # marks the folder as export's own, so --overwrite may replace it
    finally:
        store.close()
    n_ng = sum(r["final_verdict"] == "NG" for r in records)
    console.print(f"exported {len(records)} reviewed photo(s) ({len(records) - n_ng} OK, {n_ng} NG) to {out}")
    console.print(f"next: vlm-inspect prepare {out} --out DATASET")
    return out


def write_class_folders(store: StationStore, records: list[dict], folder: Path) -> None:
    """One photo (and sidecar when there is something to say) per record under `folder`."""
    for record in records:
        review = record["latest_review"]
        verdict = review["verdict"]
        kind = _folder_name(review["defect_type"]) if verdict == "NG" and review["defect_type"] else None
        target = folder / verdict.lower() / (kind or "")
        target.mkdir(parents=True, exist_ok=True)
        stem = f"{_folder_name(Path(record['file']).stem) or 'photo'}-{record['id']}"
        source = store.photo_path(record["photo_sha256"], record["photo_suffix"])
        try:
            shutil.copyfile(source, target / f"{stem}{record['photo_suffix']}")
        except FileNotFoundError:
            raise StationError(f"{source}: photo of record {record['id']} is missing from the station") from None
        sidecar = _sidecar(review)
        if sidecar:
            text = json.dumps(sidecar, ensure_ascii=False, indent=2) + "\n"
            (target / f"{stem}.json").write_text(text, encoding="utf-8")


def _sidecar(review: dict) -> dict:
    sidecar: dict = {}
    if review["description"]:
        sidecar["description"] = review["description"]
    if review["verdict"] == "NG" and review["boxes"]:
        kind = review["defect_type"]
        sidecar["defects"] = [{"type": kind, "box": box} if kind else {"box": box} for box in review["boxes"]]
    return sidecar


def _folder_name(text: str) -> str:
    """A safe file or folder name: letters, digits (any script), dash, underscore and dot kept."""
    return re.sub(r"[^\w.-]+", "_", text.strip()).strip("._")

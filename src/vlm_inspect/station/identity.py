"""Which model gave a verdict: a name and a short content hash of the model and adapter folders.

Hashing gigabytes of weights on every start would take minutes, so the hash covers what changes
whenever the weights do: the bytes of config.json and adapter_config.json, and the name, size and
modification time of every weight file. Two folders with the same hash hold the same model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CONFIGS = ("config.json", "adapter_config.json")
_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json")
HASH_CHARS = 16


def model_identity(model: str | Path | None, adapter: str | Path | None = None) -> tuple[str, str]:
    """(name, hash) of a model folder and optional adapter or run folder; folders that do not exist hash empty."""
    name = Path(model).name if model else "model"
    if adapter:
        name = f"{name} + {Path(adapter).name}"
    digest = hashlib.sha256()
    for folder in (model, adapter, Path(adapter) / "adapter" if adapter else None):
        if folder:
            _add_folder(digest, Path(folder))
    return name, digest.hexdigest()[:HASH_CHARS]


def _add_folder(digest: hashlib._Hash, folder: Path) -> None:
    if not folder.is_dir():
        return
    for config in _CONFIGS:
        path = folder / config
        if path.is_file():
            digest.update(config.encode() + b"\0" + path.read_bytes())
    for pattern in _WEIGHTS:
        for path in sorted(folder.glob(pattern)):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())

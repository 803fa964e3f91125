"""`vlm-inspect tiny-model OUT --family NAME`: a tiny random model of a family, offline, for tests and trials.

Its processor, special tokens and chat template are the family's (models/families/<name>.py), so every verb
runs on it as on the real checkpoint, in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from vlm_inspect.config import TinyModelConfig, require
from vlm_inspect.errors import ConfigError
from vlm_inspect.models.families import family_named


def tiny_model(cfg: TinyModelConfig) -> Path:
    """Build and save the tiny model; the folder."""
    problems = require(cfg, "out")
    if problems:
        raise ConfigError(problems)
    path = family_named(cfg.family).build_tiny(cfg.out, seed=cfg.seed)
    print(f"tiny model written to {path}")
    return path

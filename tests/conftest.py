"""Shared fixtures: the tiny LLaVA is built once per test session, never committed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub, and never prompt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA-1.5 in the llava-hf layout (model, tokenizer, processor)."""
    from vlm_inspect.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llava", seed=0)

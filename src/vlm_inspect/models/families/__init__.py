"""The supported model families, one module each: its `FAMILY` record (models/family.py) and the recipe of its
tiny model. A model folder's family is found from its config.json (`model_type`), never from a flag."""

from __future__ import annotations

from typing import Any

from vlm_inspect.errors import ModelFolderError
from vlm_inspect.models.families import gemma3, internvl, llava, qwen2_5_vl, qwen3_vl
from vlm_inspect.models.family import Family

FAMILIES: tuple[Family, ...] = (llava.FAMILY, qwen2_5_vl.FAMILY, qwen3_vl.FAMILY, internvl.FAMILY, gemma3.FAMILY)


def all_families() -> tuple[Family, ...]:
    return FAMILIES


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    known = ", ".join(f.name for f in FAMILIES)
    raise ModelFolderError(f"unknown model family {name!r}; known: {known}")


def family_of(model_type: str | None, where: Any = "") -> Family:
    """The family whose config says `model_type`; a ModelFolderError naming `where` otherwise."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ModelFolderError(f"{where}: model_type is {model_type!r}; vlm-inspect reads {known}")


def family_of_model(model: Any) -> Family:
    """The family of a loaded model (through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family_of(base.config.model_type, type(base).__name__)

"""Placeholder until `vlm-inspect merge` is built."""

from vlm_inspect.config import MergeConfig
from vlm_inspect.errors import NotBuiltError


def merge(cfg: MergeConfig) -> None:
    """Not built yet."""
    raise NotBuiltError("`vlm-inspect merge` is not built yet in this version")

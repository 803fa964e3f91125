"""Placeholder until `vlm-inspect prepare` is built."""

from vlm_inspect.config import PrepareConfig
from vlm_inspect.errors import NotBuiltError


def prepare(cfg: PrepareConfig) -> None:
    """Not built yet."""
    raise NotBuiltError("`vlm-inspect prepare` is not built yet in this version")

"""Placeholder until `vlm-inspect serve` is built."""

from vlm_inspect.config import ServeConfig
from vlm_inspect.errors import NotBuiltError


def serve(cfg: ServeConfig) -> None:
    """Not built yet."""
    raise NotBuiltError("`vlm-inspect serve` is not built yet in this version")

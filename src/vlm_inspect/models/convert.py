"""Placeholder until `vlm-inspect convert` is built."""

from vlm_inspect.config import ConvertConfig
from vlm_inspect.errors import NotBuiltError


def convert(cfg: ConvertConfig) -> None:
    """Not built yet."""
    raise NotBuiltError("`vlm-inspect convert` is not built yet in this version")

"""Placeholder until `vlm-inspect evaluate` is built."""

from vlm_inspect.config import EvaluateConfig
from vlm_inspect.errors import NotBuiltError


def evaluate(cfg: EvaluateConfig) -> None:
    """Not built yet."""
    raise NotBuiltError("`vlm-inspect evaluate` is not built yet in this version")

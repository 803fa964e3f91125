"""Placeholder until `vlm-inspect predict` is built."""

from vlm_inspect.config import PredictConfig
from vlm_inspect.errors import NotBuiltError


def predict(cfg: PredictConfig) -> None:
    """Not built yet."""
    raise NotBuiltError("`vlm-inspect predict` is not built yet in this version")

"""Placeholder until `vlm-inspect train` is built."""

from vlm_inspect.config import TrainConfig
from vlm_inspect.errors import NotBuiltError


def train(cfg: TrainConfig) -> None:
    """Not built yet."""
    raise NotBuiltError("`vlm-inspect train` is not built yet in this version")

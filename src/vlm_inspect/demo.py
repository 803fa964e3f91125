"""Placeholder until `vlm-inspect demo` is built."""

from vlm_inspect.config import DemoConfig
from vlm_inspect.errors import NotBuiltError


def demo(cfg: DemoConfig) -> None:
    """Not built yet."""
    raise NotBuiltError("`vlm-inspect demo` is not built yet in this version")

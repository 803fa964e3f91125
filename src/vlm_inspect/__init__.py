"""vlm-inspect: teach a vision-language model to inspect products from a few labelled photos."""

__version__ = "0.1.0"

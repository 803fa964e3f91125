"""The inspection service behind `serve` and `label`: the FastAPI app, its model worker, limits and pages.

Importing it without the `serve` extra raises the install hint, so the verbs that need it say what to install.
"""

from vlm_inspect.errors import VlmInspectError

try:
    import fastapi  # noqa: F401
    import python_multipart  # noqa: F401  (FastAPI's form parser)
    import uvicorn  # noqa: F401
except ImportError as err:  # the `serve` extra is optional
    raise VlmInspectError(
        f"this verb needs FastAPI and uvicorn ({err.name} is not installed): pip install 'vlm-inspect[serve]'"
    ) from None

"""The service's side of known-good references: the model's reference photos for the page, and the references a
chat request sends as its images before the last."""

from __future__ import annotations

import io

from fastapi.responses import Response

from vlm_inspect.data.reference import Reference
from vlm_inspect.service.http import ApiError

THUMBNAIL_SIDE = 512
"""The page shows a reference photo at most this many pixels a side."""


def reference_photo(reference: Reference, index: int) -> Response:
    """The model's `index`-th reference photo as a JPEG (from memory: no path is opened), 404 past the last."""
    if not 0 <= index < len(reference):
        raise ApiError(404, f"the model has {len(reference)} reference photo(s); there is no number {index}")
    image = reference.images[index].copy()
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return Response(buffer.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "no-store"})


def references_of(photos: list[bytes]) -> list[tuple[str, bytes]] | None:
    """A chat's images before the last as named uploads; None when there are none (the model's own are used)."""
    return [(f"image {n}", data) for n, data in enumerate(photos, start=1)] or None

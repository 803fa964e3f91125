"""The OpenAI-compatible chat route's layer: request bodies, turning chat messages into a question and images,
and answers as a completion or as server-sent chunks.

A conversation holds one photo to inspect, or known-good reference photos first and the photo last (MMAD's "the
first image is a normal sample"); the route judges the last image against the ones before it, or against the
model's own references when there is one image.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from vlm_inspect.data.reference import MAX_REFERENCES
from vlm_inspect.service.http import ERROR_TYPES, ApiError, base64_image, check_size, status_of


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _ImageURL(BaseModel):
    url: str
    detail: str | None = None


class _ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: _ImageURL


class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[Union[_TextPart, _ImagePart], Field(discriminator="type")]] | None = None


class ChatRequest(BaseModel):
    model: str | None = None
    messages: Annotated[list[_Message], Field(min_length=1)]
    stream: bool = False
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    # Greedy unless asked: an inspection answer should not change from one call to the next.
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    n: Annotated[int, Field(ge=1, le=1)] = 1


@dataclass
class Chat:
    """What a chat request asks: the photo to inspect, known-good references sent before it, and the turns."""

    photo: bytes
    references: list[bytes]
    question: str
    history: list[tuple[str, str]]


def conversation(messages: list[_Message], predictor: Any, max_upload: int) -> Chat:
    """The photo (the last image), the references (the images before it), the last question and the earlier turns
    of OpenAI chat messages; the prompt is rendered once the references are decoded (`Predictor.prompt`).

    System messages are left out: LLaVA-1.5 as tuned here has no system turn.
    """
    turns: list[list[Any]] = []  # [role, [texts]], consecutive messages of one role merged
    images: list[str] = []
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        texts, urls = _split_content(message.content)
        if urls and message.role == "assistant":
            raise ApiError(400, "images are accepted in user messages only")
        images.extend(urls)
        if turns and turns[-1][0] == message.role:
            turns[-1][1].extend(texts)
        else:
            turns.append([message.role, texts])
    if not 1 <= len(images) <= 1 + MAX_REFERENCES:
        raise ApiError(
            400,
            "send one image (an image_url part with a data: URI), or up to "
            f"{MAX_REFERENCES} known-good reference images first and the photo to inspect last; got {len(images)}",
        )
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise ApiError(400, "the conversation must start and end with a user message")
    said = ["\n".join(t for t in texts if t.strip()) for _, texts in turns]
    questions, answers = said[0::2], said[1::2]
    questions[0] = questions[0] or predictor.default_question
    history = list(zip(questions[:-1], answers, strict=True))
    photos = [_image_url_bytes(url) for url in images]
    check_size(b"".join(photos), max_upload)
    return Chat(photos[-1], photos[:-1], questions[-1], history)


def _split_content(content: str | list | None) -> tuple[list[str], list[str]]:
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    texts = [part.text for part in content if isinstance(part, _TextPart)]
    urls = [part.image_url.url for part in content if isinstance(part, _ImagePart)]
    return texts, urls


def _image_url_bytes(url: str) -> bytes:
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a path"
        raise ApiError(
            400,
            f"image_url with {scheme!r} is refused: this server never fetches or opens what a client names; "
            "send the image inline as data:image/...;base64,...",
        )
    return base64_image(url, "image_url")


def completion(text: str, model: str, defects: list[dict], reference: dict | None = None) -> dict:
    """A chat completion: the model's words as they are, and beside them (`defects`, `reference`, which OpenAI
    clients pass through) the boxes those words hold, in the photo's pixels, and the references it was judged
    against."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "defects": defects,
        "reference": reference,
    }


async def stream_response(pieces: AsyncGenerator[str, None], model: str) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format; waits for the first piece so 503/504 keep their status."""
    first = await anext(pieces, None)
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(delta: dict, finish: str | None = None) -> str:
        chunk = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            yield event({"role": "assistant", "content": ""})
            if first:
                yield event({"content": first})
            async for piece in pieces:
                if piece:
                    yield event({"content": piece})
            yield event({}, "stop")
            yield "data: [DONE]\n\n"
        except Exception as err:  # the status line is sent; the error travels as the last event
            status, message = status_of(err)
            body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error")}}
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            await pieces.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

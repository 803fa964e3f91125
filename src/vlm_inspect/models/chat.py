"""Conversations rendered by the processor's chat template, for every family alike.

Training supervises each answer and the token that ends its turn (LLaVA's `</s>`, ChatML's `<|im_end|>`,
Gemma's `<end_of_turn>`), not the newline some templates add after it. Prompts for scoring and describing
are the same rendering with the generation prompt (`ASSISTANT:`, `<|im_start|>assistant\\n`, ...).

A conversation with known-good references holds several image parts in its first turn (`images`), the references'
first and the photo's last, which the template renders as the family's image tokens, one block per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlm_inspect.errors import ModelFolderError

IMAGE = "<image>"  # how LLaVA-format questions mark the image; removed before rendering


def messages(turns: list[tuple[str, str | None]], images: int = 1) -> list[dict]:
    """Chat messages of (question, answer) turns, `images` image parts in the first question; a None answer ends
    it."""
    out = []
    for i, (question, answer) in enumerate(turns):
        text = {"type": "text", "text": question.replace(IMAGE, "").strip()}
        out.append({"role": "user", "content": [*[{"type": "image"}] * images, text] if i == 0 else [text]})
        if answer is not None:
            out.append({"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]})
    return out


def render(processor: Any, turns: list[tuple[str, str | None]], images: int = 1) -> str:
    """The text of the conversation; ending with the generation prompt when the last answer is None."""
    open_end = turns[-1][1] is None
    return processor.apply_chat_template(messages(turns, images), add_generation_prompt=open_end, tokenize=False)


def prompt(processor: Any, question: str, history: list[tuple[str, str]] | None = None, images: int = 1) -> str:
    """The text before the model's next answer (earlier turns of the same conversation in `history`)."""
    return render(processor, [*(history or []), (question, None)], images)


@dataclass
class Conversation:
    """A whole conversation's text, its token ids (image placeholder not yet expanded) and the token spans
    of what training supervises."""

    text: str
    ids: list[int]
    spans: list[tuple[int, int]]


def conversation(processor: Any, turns: list[tuple[str, str]], images: int = 1) -> Conversation:
    """Render and tokenize a conversation; each answer's span is where the text with the answer goes past
    the prompt before it. Raises if the template is not prefix-stable (the span would be wrong)."""
    tokenizer = processor.tokenizer
    text = render(processor, turns, images)
    ids = tokenizer(text)["input_ids"]
    spans = []
    for k in range(len(turns)):
        before = tokenizer(render(processor, [*turns[:k], (turns[k][0], None)], images))["input_ids"]
        through = tokenizer(render(processor, turns[: k + 1], images))["input_ids"]
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise ModelFolderError(
                "the chat template does not render a conversation as its prompts followed by answers; "
                "answers cannot be told apart from prompts for training"
            )
        end = len(through)
        while end > len(before) and not tokenizer.decode(through[end - 1 : end]).strip():
            end -= 1  # the newline after the end-of-turn token is the template's, not the answer's
        spans.append((len(before), end))
    return Conversation(text, ids, spans)

"""The LLaVA-1.5 conversation format, in one place for training, prediction and serving.

LLaVA-1.5 (`conv_vicuna_v1`, and llava-hf's chat template) renders
`USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {next question} ASSISTANT:`.
Training supervises only the answers and the `</s>` after each one.
"""

from __future__ import annotations

IMAGE = "<image>"

# Jinja chat template saved with every processor we write. It renders the same text as
# `render_prompt`, so plain `processor.apply_chat_template` gives our prompt.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}{% else %}{{ message['role'] | upper + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def render_prompt(question: str, history: list[tuple[str, str]] | None = None, eos: str = "</s>") -> str:
    """The text before the model's next answer; the image goes in the first user turn.

    `history` holds earlier (question, answer) pairs of the same conversation.
    """
    turns = [*(history or []), (question, None)]
    parts = []
    for i, (q, a) in enumerate(turns):
        q = q.replace(IMAGE, "").strip()
        parts.append(f"USER: {IMAGE}\n{q} " if i == 0 else f"USER: {q} ")
        parts.append("ASSISTANT:" if a is None else f"ASSISTANT: {a}{eos}")
    return "".join(parts)


def conversation_segments(turns: list[tuple[str, str]], eos: str = "</s>") -> list[tuple[str, bool]]:
    """Split a whole conversation into (text, supervised) pieces; joined they give the full text.

    Supervised pieces are each answer (with its leading space) and the `</s>` that ends it.
    """
    pieces: list[tuple[str, bool]] = []
    for i, (question, answer) in enumerate(turns):
        q = question.replace(IMAGE, "").strip()
        pieces.append((f"USER: {IMAGE}\n{q} ASSISTANT:" if i == 0 else f"USER: {q} ASSISTANT:", False))
        pieces.append((f" {answer.strip()}{eos}", True))
    return pieces

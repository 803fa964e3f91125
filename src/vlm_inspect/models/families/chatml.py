"""What the ChatML families' tiny models share: special tokens and a chat template like their checkpoints'.

Real checkpoints bring their own tokenizer and template; these exist only so tests and trials run offline.
"""

from __future__ import annotations

from typing import Any

from vlm_inspect.models.families.common import build_tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chatml_template(image: str, default_system: str | None = None) -> str:
    """ChatML as the Qwen and InternVL checkpoints render it; `image` is the text an image part becomes."""
    system = (
        f"{{% if loop.first and m['role'] != 'system' %}}{IM_START}system\n{default_system}{IM_END}\n{{% endif %}}"
        if default_system
        else ""
    )
    return (
        "{% for m in messages %}" + system + IM_START + "{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}" + image + "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + IM_END + "\n{% endfor %}"
        "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
    )


def chatml_tokenizer(specials: tuple[str, ...], template: str, named: dict[str, str] | None = None) -> Any:
    return build_tokenizer(
        specials=(IM_START, IM_END, *specials), eos=IM_END, add_bos=False, named=named, chat_template=template
    )

"""LLaVA-1.5 (llava-hf layout): a fixed 336 px square view (576 image tokens), its original prompt format.

The only family with the measured GPU fast paths (compiled layers, the CUDA-graph greedy decoder) and the
original-repo conversions (`convert`)."""

from __future__ import annotations

from vlm_inspect.models.family import Family
from vlm_inspect.models.template import LLAVA_CHAT_TEMPLATE
from vlm_inspect.models.tiny import save_tiny_model

FAMILY = Family(
    name="llava",
    model_types=("llava",),
    vision="vision_tower",
    projector="multi_modal_projector",
    chat_template=LLAVA_CHAT_TEMPLATE,
    square_pad=True,
    fast_paths=True,
    compile_training=True,
    build_tiny=save_tiny_model,
)

"""The memory plan of a training run: how large a batch fits the GPU, and how few decoder layers need to
recompute their activations (activation checkpointing) to fit it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console

from vlm_inspect.config import TrainConfig
from vlm_inspect.models.families import family_of_model

console = Console()


def language_layers(model: Any) -> Any:
    """The decoder layers of the language model, through a PEFT wrapper if there is one."""
    return family_of_model(model).language_layers(model)


def apply_checkpointing(model: Any, checkpointing: Checkpointing) -> None:
    """Recompute the activations of the first `checkpointing.layers` decoder layers in the backward pass.

    Fewer recomputed layers is faster (each one costs an extra forward); the memory plan picks the fewest
    that fit. Non-reentrant checkpointing, so LoRA weights inside a layer get their gradients.
    """
    if not checkpointing:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable()  # defaults to use_reentrant=False in transformers 5
    keep_vision_tower_out_of_backward(base)
    for index, layer in enumerate(language_layers(model)):
        layer.gradient_checkpointing = index < checkpointing.layers


def keep_vision_tower_out_of_backward(base: Any) -> None:
    """Undo what enabling checkpointing does to the frozen vision tower.

    transformers checkpoints the vision layers too, and hooks every input embedding, the tower's patch
    embedding among them, to output a tensor that requires grad. The tower was then run twice and
    back-propagated through on every step, for no gradient anyone uses: on the 7B shape at batch 8 that
    was ~80 ms of a 530 ms step (H200: 15.0 → 17.7 samples/s), mostly the GPU waiting on launches. Non-reentrant
    checkpointing needs no input that requires grad, so the hooks can go.
    """
    base.disable_input_require_grads()
    for module in family_of_model(base).vision_tower(base).modules():
        if getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False


@dataclass(frozen=True)
class Checkpointing:
    """How many decoder layers recompute their activations in the backward pass (0: none)."""

    layers: int
    total: int
    estimate_gib: float | None = None
    """The memory plan's estimate of the peak, on a GPU."""
    budget_gib: float | None = None
    """The memory the plan had to fit in, on a GPU."""

    def __bool__(self) -> bool:
        return self.layers > 0

    def __str__(self) -> str:
        if self.layers == 0:
            return "off"
        return "on (all layers)" if self.layers >= self.total else f"on ({self.layers} of {self.total} layers)"


# Bytes per token of activations, fitted to peaks measured by benchmarks/gpu.py on an H100 (LLaVA-1.5-7B
# shape, compiled layers, 640-token samples; fits batch 8 and 16 with 0, 16 and 32 recomputed layers within
# 0.3 GiB): a layer that is not recomputed keeps 15·hidden + 6.95·intermediate bytes per token (the inputs of
# its LoRA matmuls, attention and SwiGLU); a recomputed one keeps its 2·hidden-byte input; the backward's
# transient buffers, the image features and the loss add 89.5·hidden.
ACT_PER_HIDDEN, ACT_PER_FFN = 15.0, 6.95


ACT_OUTSIDE_LAYERS = 89.5


# cuBLAS workspaces and the allocator's rounding beyond what the fit covers.
OVERHEAD_GIB = 0.3


# Share of the free GPU memory the plan fills: the rest absorbs fragmentation and estimate error. Near the
# limit the allocator frees and retries (measured: 30 of 32 recomputed layers at 95% ran slower than 32 of
# 32 with room to spare), and leaving a layer un-recomputed saves only ~1/96 of a step.
MEMORY_SHARE = 0.9


def optimizer_name(cfg: TrainConfig) -> str:
    """The Trainer's optimizer: fused AdamW (one kernel per parameter group), or for QLoRA bitsandbytes' 8-bit AdamW.

    QLoRA exists to fit a small card, and there the two AdamW moments are the largest thing after the
    4-bit weights (1.2 GiB in bf16 for LoRA r 128 on the 7B); in 8 bits they take half. bitsandbytes is
    installed whenever QLoRA runs.
    """
    return "adamw_bnb_8bit" if cfg.method == "qlora" else "adamw_torch_fused"


def estimate_memory_gib(
    model: Any, batch: int, seq: int, checkpointing: bool | int | Checkpointing, eight_bit_moments: bool = False
) -> float:
    """Peak GPU memory of a training step (what torch reports as max allocated).

    weights + Adam moments + activations or gradients, whichever is larger: a checkpointed layer
    keeps only its input, the others keep everything their backward needs (see the constants above).
    """
    text = model.config.text_config if hasattr(model.config, "text_config") else model.config
    h, ffn, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    if isinstance(checkpointing, Checkpointing):
        recomputed = checkpointing.layers
    else:
        recomputed = layers if checkpointing is True else int(checkpointing)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # AdamW's two moments and the gradients, in the parameter's dtype (fp32 LoRA, bf16 projector copy).
    # Gradients appear as the backward frees activations, so the peak holds one or the other.
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    grads = trainable
    moments = 2 * sum(p.numel() for p in model.parameters() if p.requires_grad) if eight_bit_moments else 2 * grads
    tokens = batch * seq
    full_layer = tokens * (ACT_PER_HIDDEN * h + ACT_PER_FFN * ffn)
    acts = (layers - recomputed) * full_layer + recomputed * tokens * 2 * h + tokens * ACT_OUTSIDE_LAYERS * h
    return (weights + moments + max(acts, grads)) / 2**30 + OVERHEAD_GIB


def gpu_memory_gib(device: torch.device) -> float:
    """Memory this process can give to tensors: the card's total less the CUDA context and other users."""
    free, total = torch.cuda.mem_get_info(device)
    in_use_by_us = torch.cuda.memory_reserved(device)
    context = 0.5 * 2**30
    return (min(total - context, free + in_use_by_us)) / 2**30


def choose_batch_size(cfg: TrainConfig, model: Any, dataset: Any, device: torch.device) -> tuple[int, Checkpointing]:
    """Batch size and activation checkpointing: the user's, or what fits the device memory.

    The largest batch of 8, 4, 2, 1 (at most the number of samples) that fits, with as few checkpointed
    layers as fit: each recomputed layer costs a third more of that layer's work.
    """
    layers = language_layers(model)
    total = len(layers)
    seq = max(dataset.lengths)
    if cfg.gradient_checkpointing is None:
        options = list(range(total + 1))
    else:
        options = [total if cfg.gradient_checkpointing else 0]
    if device.type != "cuda":
        return cfg.batch_size or min(8, len(dataset)), Checkpointing(total if cfg.gradient_checkpointing else 0, total)
    budget = MEMORY_SHARE * gpu_memory_gib(device)
    eight_bit = optimizer_name(cfg) == "adamw_bnb_8bit"
    sizes = [cfg.batch_size] if cfg.batch_size else [b for b in (8, 4, 2, 1) if b <= len(dataset)] or [1]
    for batch in sizes:
        for recomputed in options:
            estimate = estimate_memory_gib(model, batch, seq, recomputed, eight_bit)
            if estimate <= budget:
                return batch, Checkpointing(recomputed, total, estimate, budget)
    estimate = estimate_memory_gib(model, sizes[-1], seq, options[-1], eight_bit)
    # Over the plan's share is not over the card: the share is headroom (the Qwen2.5-VL-7B shape at the 24 GB
    # plan: estimate 20.9 GiB over the 20.8 share, peak 21.0 of 23.1). Warn only where the card itself is short.
    if estimate > budget / MEMORY_SHARE:
        console.print(
            f"[yellow]the memory estimate ({estimate:.1f} GiB) exceeds this GPU's {budget / MEMORY_SHARE:.1f} GiB[/]"
        )
    return sizes[-1], Checkpointing(options[-1], total, estimate, budget)

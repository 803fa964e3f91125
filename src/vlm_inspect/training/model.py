"""The model `train` trains: the base loaded once from its checked folder, with LoRA (PEFT) on every
language-model linear layer and the projector trained fully beside it, QLoRA's 4-bit base, or all
language-model weights for full fine-tuning; the vision tower stays frozen unless asked."""

from __future__ import annotations

from typing import Any

import torch

from vlm_inspect.config import TrainConfig
from vlm_inspect.errors import ConfigError, VlmInspectError
from vlm_inspect.folders import ModelFolder
from vlm_inspect.models.family import LORA_TARGETS, Family
from vlm_inspect.models.fp8 import to_fp8
from vlm_inspect.models.load import load_model


def build_model(cfg: TrainConfig, folder: ModelFolder, dtype: torch.dtype, device: torch.device) -> tuple[Any, int]:
    """Base model with the chosen method applied; vision tower frozen. Returns (model, trainable count)."""
    family = folder.family
    quant = _qlora_config(dtype, family) if cfg.method == "qlora" else None
    if cfg.method == "qlora" and device.type != "cuda":
        raise ConfigError(["method: qlora needs a CUDA GPU (bitsandbytes 4-bit); use method=lora on this machine"])
    model = load_model(folder, dtype=dtype, device=device, quantization_config=quant)
    if quant is not None:
        check_vision_and_projector_unquantized(model, family, folder.path)
    # No KV cache in training; the text config is what the language model reads (a cache there costs
    # memory and makes compiled layers recompile for every layer index).
    model.config.use_cache = model.config.get_text_config().use_cache = False
    model.requires_grad_(False)
    if cfg.method == "full":
        family.inner(model).language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        family.projector_module(model).requires_grad_(cfg.train_projector)
        family.vision_tower(model).requires_grad_(getattr(cfg, "train_vision_tower", False))
    else:
        model = apply_lora(model, cfg, family)
        if cfg.method == "qlora":
            keep_adapter_in(model, dtype)
    if cfg.precision == "fp8":
        to_fp8(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, trainable


def apply_lora(model: Any, cfg: TrainConfig, family: Family) -> Any:
    """PEFT LoRA on every language-model linear layer, the projector trained fully beside it."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=LORA_TARGETS,
        modules_to_save=[family.projector] if cfg.train_projector else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def keep_adapter_in(model: Any, dtype: torch.dtype) -> None:
    """Trainable weights (LoRA, projector) in the compute dtype, so gradients and AdamW moments are too.

    For QLoRA: the fp32 copies PEFT makes (16 bytes per LoRA weight with gradient and moments) cost more
    than the 4-bit base itself; in bf16 they take half. The LoRA matmuls run in bf16 either way.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _qlora_config(dtype: torch.dtype, family: Family) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise ConfigError([f"method: qlora needs bitsandbytes: pip install 'vlm-inspect[gpu]' ({err})"]) from None
    # The vision tower and projector stay in bf16 and the projector stays trainable.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=family.qlora_keep_unquantized(),
    )


def check_vision_and_projector_unquantized(model: Any, family: Family, folder: Any) -> None:
    """Raise if bitsandbytes quantized any vision-tower or projector weight (the projector must train)."""
    parts = {family.vision: family.vision_tower(model), family.projector: family.projector_module(model)}
    quantized = [
        f"{part}.{name}"
        for part, module in parts.items()
        for name, p in module.named_parameters()
        if not p.dtype.is_floating_point
    ]
    if quantized:
        raise VlmInspectError(
            f"{folder}: bitsandbytes quantized {len(quantized)} weights that must stay in 16 bits "
            f"(e.g. {quantized[0]}); this transformers/bitsandbytes pair ignores the skip list"
        )

"""The pieces `train` wires together: model + PEFT, memory plan, Trainer, callbacks, final save."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from vlm_inspect.config import TrainConfig
from vlm_inspect.data.dataset import IGNORE_INDEX
from vlm_inspect.errors import ConfigError, VlmInspectError
from vlm_inspect.models.family import LORA_TARGETS, Family, family_of_model
from vlm_inspect.models.fast_paths import compile_slots, pack_vision
from vlm_inspect.models.fp8 import to_fp8
from vlm_inspect.models.load import folder_family, load_model
from vlm_inspect.plan import ADAPTER_DIR, CHECKPOINTS, COMPLETE_MARKER, FULL_MODEL_DIR, Plan, lr_factor
from vlm_inspect.resume import CompleteThenRotate

console = Console()
# Grow CUDA memory segments instead of adding fixed blocks: less fragmentation, so the memory plan holds.
# Read when CUDA makes its first allocation, which comes after this import in `train`.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


# ------------------------------------------------------------------ model


def build_model(cfg: TrainConfig, dtype: torch.dtype, device: torch.device) -> tuple[Any, int]:
    """Base model with the chosen method applied; vision tower frozen. Returns (model, trainable count)."""
    family = folder_family(cfg.model)
    quant = _qlora_config(dtype, family) if cfg.method == "qlora" else None
    if cfg.method == "qlora" and device.type != "cuda":
        raise ConfigError(["method: qlora needs a CUDA GPU (bitsandbytes 4-bit); use method=lora on this machine"])
    model = load_model(cfg.model, dtype=dtype, device=device, quantization_config=quant)
    if quant is not None:
        check_vision_and_projector_unquantized(model, family, cfg.model)
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
        model = apply_lora(model, cfg)
        if cfg.method == "qlora":
            keep_adapter_in(model, dtype)
    if cfg.precision == "fp8":
        to_fp8(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, trainable


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    """PEFT LoRA on every language-model linear layer, the projector trained fully beside it."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=LORA_TARGETS,
        modules_to_save=[family_of_model(model).projector] if cfg.train_projector else None,
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


# ------------------------------------------------------------------ speed


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


def compile_layers(model: Any) -> None:
    """torch.compile each decoder layer (one graph shared by all): fuses norms, rotary, SiLU and LoRA adds.

    The vision tower's layers too (a graph of their own, as for scoring). Not measured apart: at batch 8
    each compiled vision layer costs ~1.1 ms of Python for ~0.4 ms of GPU work, and one profile hints
    that eager layers launch faster (`benchmarks/README.md`).
    """
    for parent, name in compile_slots(model):
        getattr(parent, name).compile(dynamic=None)


def use_compile(cfg: TrainConfig, device: torch.device, family: Family) -> bool:
    """Whether to compile the layers: the setting, or by default on CUDA in one process or under DDP,
    ZeRO-2 or FSDP for the families where it was measured (LLaVA-1.5 on an H100: LoRA 1.5×, QLoRA 1.2×
    samples/s; on 2 H200s: ZeRO-2 1.31×, FSDP 1.23×; Qwen2.5-VL-7B shape on an H200, LoRA at the 24 GB
    plan: 1.38 → 2.44 samples/s at 1,280 image tokens, 1.88 → 3.29 at 546). Off on CPU, where compiling costs more than it
    saves, and under ZeRO-3, whose parameter-gathering hooks run inside each layer."""
    wanted = getattr(cfg, "compile", None)
    if wanted is not None:
        return bool(wanted)
    return device.type == "cuda" and cfg.distributed != "zero3" and family.compile_training


# ------------------------------------------------------------------ memory plan


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


def print_plan(
    cfg: TrainConfig,
    plan: Plan,
    trainable: int,
    model: Any,
    device: Any,
    dtype: Any,
    checkpointing: Checkpointing,
) -> None:
    """The run's plan as a table, before any step."""
    total = sum(p.numel() for p in model.parameters())
    table = Table(title=f"Training plan: {cfg.method} on {device} ({str(dtype).removeprefix('torch.')})")
    table.add_column("item")
    table.add_column("value", justify="right")
    rows = [
        ("samples", plan.samples),
        ("batch per device × processes × grad accum", f"{plan.batch_size} × {plan.world_size} × {plan.grad_accum}"),
        ("effective batch", plan.effective_batch),
        ("optimizer steps per epoch", plan.steps_per_epoch),
        ("optimizer steps", plan.total_steps),
        ("epochs", f"{plan.epochs:.1f}"),
        ("warmup steps (lr never 0)", plan.warmup_steps),
        ("learning rate / projector", f"{cfg.lr:g} / {cfg.projector_lr:g}"),
        ("trainable parameters", f"{trainable:,} ({100 * trainable / max(total, 1):.2f}%)"),
        ("activation checkpointing", str(checkpointing)),
        ("compiled layers", "yes" if use_compile(cfg, torch.device(device), family_of_model(model)) else "no"),
        ("checkpoint every", f"{plan.save_steps} steps"),
    ]
    if checkpointing.estimate_gib is not None:
        rows.append(("memory estimate", f"{checkpointing.estimate_gib:.1f} GiB of {checkpointing.budget_gib:.1f}"))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


# ------------------------------------------------------------------ trainer


class InspectTrainer(Trainer):
    """The stock Trainer with three changes: the projector has its own learning rate, the schedule's warmup
    never gives a step at lr 0 (LLaVA's recipe does on tiny data), and the language-model head and
    cross-entropy run only on the supervised answer tokens.

    The loss is the stock one (sum of token cross-entropies in fp32 over the tokens of the whole
    accumulated batch); only the logits of the ~600 image and question tokens per sample, which the loss
    ignores, are never computed: they cost a vocab-wide matmul and a float32 copy of (tokens × vocab).
    """

    def __init__(self, *args: Any, projector_lr: float, scheduler_kind: str, warmup_steps: int, **kwargs: Any):
        super().__init__(*args, compute_loss_func=supervised_token_loss, **kwargs)
        self.projector_lr, self.scheduler_kind, self.warmup = projector_lr, scheduler_kind, warmup_steps
        # The token count reaches the loss function, not the model: a changing count passed into compiled
        # layers would recompile them.
        self.model_accepts_loss_kwargs = False
        self._flop_weights: int | None = None
        self.remove_callback(ProgressCallback)
        self.add_callback(QuietProgress())

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The stock estimate (6 × input tokens × non-embedding weights), with the weight count taken once.

        The stock method counts the weights on every step by walking all modules and parameters; through
        PEFT's thousands of LoRA modules that took ~28 ms of Python per step, with the GPU idle.
        """
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flop_weights is None:
            self._flop_weights = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flop_weights

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        with logits_only_at(head, supervised_positions(inputs["labels"])):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            projector = family_of_model(opt_model).projector
            groups = [
                {"params": [p for n, p in named if projector not in n], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if projector in n], "weight_decay": 0.0, "lr": self.projector_lr},
            ]
            groups = [g for g in groups if g["params"]]
            optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None:
            kind, warmup = self.scheduler_kind, self.warmup
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda step: lr_factor(step, warmup, num_training_steps, kind)
            )
        return self.lr_scheduler


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) mask of the positions whose next token is supervised: where the LM head is needed."""
    return F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


@contextlib.contextmanager
def logits_only_at(head: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Inside, `head` sees only the hidden states at `positions`: logits come out as (count, vocab)."""
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][positions], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def supervised_token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """transformers' causal-LM loss on logits already cut to the supervised positions (`logits_only_at`).

    Sum of fp32 cross-entropies divided by the supervised-token count of the whole accumulated batch,
    as the stock loss does when the Trainer passes that count.
    """
    shifted = labels[:, 1:]
    targets = shifted[shifted != IGNORE_INDEX].to(outputs.logits.device)
    loss = F.cross_entropy(outputs.logits.float(), targets, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if torch.is_tensor(count):
        count = count.to(loss.device)
    return loss / count


class MetricsFile(TrainerCallback):
    """Every log row to RUN/metrics.jsonl; on resume, rows past the checkpoint are dropped first.

    Rows also carry `seconds` since this process began training (speed between any two rows) and, on a
    GPU, `gpu_peak_gib`, the most memory this process's tensors have held so far.
    """

    def __init__(self, path: Path):
        self.path = path
        self.started = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        if not state.is_world_process_zero or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("step", 0) <= state.global_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
            row["seconds"] = round(time.perf_counter() - self.started, 3)
            if torch.cuda.is_available():
                row["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


class FreezeLongLivedObjects(TrainerCallback):
    """Move the objects alive when training starts, and again after the first step (compiled graphs and
    their caches), out of the garbage collector's sight.

    The model, PEFT's modules and torch.compile's caches are millions of Python objects that live for
    the whole run; every full collection walked them all. With these objects in view, a full collection took
    0.25–0.55 s and came every few steps, stalling the GPU (7B shape, H200: 17.05 → 17.71 samples/s at
    batch 8; QLoRA 12.05 → 15.9–16.4).
    Frozen objects are still freed normally when their references go; they are only skipped by the
    cycle collector.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        gc.collect()
        gc.freeze()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 1:
            gc.collect()
            gc.freeze()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        gc.unfreeze()


class AugmentationEpoch(TrainerCallback):
    """Tells the dataset the epoch, so augmentation is the same whether or not a run was resumed."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loader = kwargs.get("train_dataloader")
        per_epoch = max(1, len(loader) // args.gradient_accumulation_steps) if loader is not None else 1
        self.dataset.epoch = state.global_step // per_epoch


class QuietProgress(ProgressCallback):
    """The progress bar without the raw log dict the stock one prints under it at every log step
    (the rows are in metrics.jsonl)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        return


def latest_complete_checkpoint(run: Path) -> Path | None:
    """The newest checkpoint whose marker says it was fully written."""
    folders = [p for p in (run / CHECKPOINTS).glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    if not folders:
        console.print(f"[yellow]no complete checkpoint in {run / CHECKPOINTS}; starting from the beginning[/]")
        return None
    return max(folders, key=lambda p: int(p.name.rsplit("-", 1)[1]))


def build_trainer(
    cfg: TrainConfig,
    run: Path,
    model: Any,
    dataset: Any,
    collator: Any,
    plan: Plan,
    dtype: torch.dtype,
    checkpointing: Checkpointing | bool,
    resume_from: Path | None,
) -> InspectTrainer:
    """A Trainer set up from the plan; tensorboard or wandb only when asked for.

    Checkpointing and compiling are applied to the model here (not through TrainingArguments, which
    knows only all layers or none).
    """
    on_gpu = torch.cuda.is_available()
    if not isinstance(checkpointing, Checkpointing):
        total = len(language_layers(model))
        checkpointing = Checkpointing(total if checkpointing else 0, total)
    apply_checkpointing(model, checkpointing)
    pack_vision(model)  # on CUDA, the Qwen towers' attention as one call per layer (models/qwen_vision.py)
    if use_compile(cfg, next(model.parameters()).device, family_of_model(model)):
        compile_layers(model)
    if cfg.report_to == "tensorboard":
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run / "tensorboard"))
    args = TrainingArguments(
        output_dir=str(run / CHECKPOINTS),
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        max_steps=plan.total_steps,
        learning_rate=cfg.lr,
        weight_decay=0.0,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=plan.save_steps,
        save_total_limit=None,  # CompleteThenRotate deletes old checkpoints only once the new one is complete
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        dataloader_num_workers=(4 if on_gpu else 0) if cfg.num_workers is None else cfg.num_workers,
        remove_unused_columns=False,
        optim=optimizer_name(cfg),
        ddp_find_unused_parameters=False,
        # The stock filter replaces a NaN or inf loss in the logs by the running mean, hiding a diverged run,
        # and reads the loss back from the GPU on every step to do so.
        logging_nan_inf_filter=False,
        disable_tqdm=False,
    )
    return InspectTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[
            MetricsFile(run / "metrics.jsonl"),
            AugmentationEpoch(dataset),
            CompleteThenRotate(cfg.save_total_limit),
            FreezeLongLivedObjects(),
        ],
        projector_lr=cfg.projector_lr,
        scheduler_kind=cfg.scheduler,
        warmup_steps=plan.warmup_steps,
    )


def save_final(cfg: TrainConfig, run: Path, trainer: InspectTrainer, processor: Any) -> Path:
    """Write the adapter (or full model) to a temporary folder, then rename it into place."""
    name = FULL_MODEL_DIR if cfg.method == "full" else ADAPTER_DIR
    final, tmp = run / name, run / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        (tmp / "training_args.bin").unlink(missing_ok=True)
        if cfg.method == "full":
            processor.save_pretrained(tmp)
        os.replace(tmp, final)
        console.print(f"[green]done:[/] {final}")
    return final

"""The pieces `train` wires together: model + PEFT, memory plan, Trainer, callbacks, final save."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import Trainer, TrainerCallback, TrainingArguments

from vlm_inspect.config import TrainConfig
from vlm_inspect.errors import ConfigError
from vlm_inspect.models.load import load_model
from vlm_inspect.train import (
    ADAPTER_DIR,
    CHECKPOINTS,
    COMPLETE_MARKER,
    FULL_MODEL_DIR,
    LORA_TARGETS,
    PROJECTOR,
    Plan,
    lr_factor,
)

console = Console()


# ------------------------------------------------------------------ model


def build_model(cfg: TrainConfig, dtype: torch.dtype, device: torch.device) -> tuple[Any, int]:
    """Base model with the chosen method applied; vision tower frozen. Returns (model, trainable count)."""
    quant = _qlora_config(dtype) if cfg.method == "qlora" else None
    if cfg.method == "qlora" and device.type != "cuda":
        raise ConfigError(["method: qlora needs a CUDA GPU (bitsandbytes 4-bit); use method=lora on this machine"])
    model = load_model(cfg.model, dtype=dtype, device=device, quantization_config=quant)
    model.config.use_cache = False
    model.requires_grad_(False)
    if cfg.method == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        model.model.multi_modal_projector.requires_grad_(cfg.train_projector)
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=LORA_TARGETS,
            modules_to_save=[PROJECTOR] if cfg.train_projector else None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, trainable


def _qlora_config(dtype: torch.dtype) -> Any:
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
        llm_int8_skip_modules=["vision_tower", PROJECTOR, "lm_head"],
    )


# ------------------------------------------------------------------ memory plan


def estimate_memory_gib(model: Any, batch: int, seq: int, checkpointing: bool) -> float:
    """Rough peak GPU memory: weights, trainable states (fp32 param + grad + Adam), activations, logits."""
    text = model.config.text_config if hasattr(model.config, "text_config") else model.config
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    heads = text.num_attention_heads
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    states = trainable * 16
    if checkpointing:  # layer inputs kept, one layer recomputed at a time
        acts = batch * (layers * seq * h * 2 + 34 * seq * h + 5 * heads * seq * seq)
    else:  # Korthikanti et al.: ~34·s·h + 5·a·s² bytes per layer in 16-bit
        acts = batch * layers * (34 * seq * h + 5 * heads * seq * seq)
    logits = batch * seq * vocab * 4 * 2
    return (weights + states + acts + logits) / 2**30


def choose_batch_size(cfg: TrainConfig, model: Any, dataset: Any, device: torch.device) -> tuple[int, bool]:
    """Batch size and activation checkpointing: the user's, or what fits the device memory."""
    seq = max(len(t.input_ids) for t in dataset.tokens)
    if device.type != "cuda":
        return cfg.batch_size or min(8, len(dataset)), bool(cfg.gradient_checkpointing)
    budget = 0.9 * torch.cuda.get_device_properties(device).total_memory / 2**30
    options = [False, True] if cfg.gradient_checkpointing is None else [cfg.gradient_checkpointing]
    sizes = [cfg.batch_size] if cfg.batch_size else [8, 4, 2, 1]
    for checkpointing in options:
        for batch in sizes:
            if estimate_memory_gib(model, batch, seq, checkpointing) <= budget:
                return batch, checkpointing
    return sizes[-1], options[-1]


def print_plan(
    cfg: TrainConfig, plan: Plan, trainable: int, model: Any, device: Any, dtype: Any, checkpointing: bool
) -> None:
    """The run's plan as a table, before any step."""
    total = sum(p.numel() for p in model.parameters())
    seq_note = ""
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
        ("activation checkpointing", "on" if checkpointing else "off"),
        ("checkpoint every", f"{plan.save_steps} steps{seq_note}"),
    ]
    if device.type == "cuda":
        rows.append(("memory estimate", f"{estimate_memory_gib(model, plan.batch_size, 640, checkpointing):.1f} GiB"))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


# ------------------------------------------------------------------ trainer


class InspectTrainer(Trainer):
    """The stock Trainer with two changes: the projector has its own learning rate, and the
    schedule's warmup never gives a step at lr 0 (LLaVA's recipe does on tiny data)."""

    def __init__(self, *args: Any, projector_lr: float, scheduler_kind: str, warmup_steps: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.projector_lr, self.scheduler_kind, self.warmup = projector_lr, scheduler_kind, warmup_steps

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if PROJECTOR not in n], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if PROJECTOR in n], "weight_decay": 0.0, "lr": self.projector_lr},
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


class MetricsFile(TrainerCallback):
    """Every log row to RUN/metrics.jsonl; on resume, rows past the checkpoint are dropped first."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("step", 0) <= state.global_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


class AugmentationEpoch(TrainerCallback):
    """Tells the dataset the epoch, so augmentation is the same whether or not a run was resumed."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loader = kwargs.get("train_dataloader")
        per_epoch = max(1, len(loader) // args.gradient_accumulation_steps) if loader is not None else 1
        self.dataset.epoch = state.global_step // per_epoch


class MarkCheckpointComplete(TrainerCallback):
    """A marker file written after every piece of a checkpoint is on disk."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE_MARKER).write_text(str(state.global_step))


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
    checkpointing: bool,
    resume_from: Path | None,
) -> InspectTrainer:
    """A Trainer set up from the plan; tensorboard or wandb only when asked for."""
    on_gpu = torch.cuda.is_available()
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
        save_total_limit=cfg.save_total_limit,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        dataloader_num_workers=cfg.num_workers,
        remove_unused_columns=False,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
    return InspectTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[MetricsFile(run / "metrics.jsonl"), AugmentationEpoch(dataset), MarkCheckpointComplete()],
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

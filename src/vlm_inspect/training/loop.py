"""The training loop: the stock Trainer with our loss, learning rates and callbacks, set up from the run's plan,
and the final save of the adapter or model."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from vlm_inspect.config import TrainConfig
from vlm_inspect.data.dataset import IGNORE_INDEX
from vlm_inspect.folders import ModelFolder, RunFolder
from vlm_inspect.models.families import family_of_model
from vlm_inspect.models.family import Family
from vlm_inspect.models.fast_paths import compile_slots, pack_vision
from vlm_inspect.training.checkpoints import CompleteThenRotate
from vlm_inspect.training.memory import Checkpointing, apply_checkpointing, language_layers, optimizer_name
from vlm_inspect.training.plan import Plan, lr_factor

console = Console()
# Grow CUDA memory segments instead of adding fixed blocks: less fragmentation, so the memory plan holds.
# Read when CUDA makes its first allocation, which comes after this import in `train`.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


# ------------------------------------------------------------------ speed and plan


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


def print_plan(
    cfg: TrainConfig,
    plan: Plan,
    trainable: int,
    model: Any,
    device: Any,
    dtype: Any,
    checkpointing: Checkpointing,
    image_tokens: tuple[int, int] | None = None,
) -> None:
    """The run's plan as a table, before any step; `image_tokens` (the photo's, its references') of the longest
    sample."""
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
        *(
            [("image tokens per sample: photo + references", "{:,} + {:,}".format(*image_tokens))]
            if image_tokens
            else []
        ),
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


def build_trainer(
    cfg: TrainConfig,
    run: RunFolder,
    model: Any,
    dataset: Any,
    collator: Any,
    plan: Plan,
    dtype: torch.dtype,
    checkpointing: Checkpointing | bool,
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
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run.path / "tensorboard"))
    args = TrainingArguments(
        output_dir=str(run.checkpoints_path),
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
            MetricsFile(run.metrics_path),
            AugmentationEpoch(dataset),
            CompleteThenRotate(cfg.save_total_limit),
            FreezeLongLivedObjects(),
        ],
        projector_lr=cfg.projector_lr,
        scheduler_kind=cfg.scheduler,
        warmup_steps=plan.warmup_steps,
    )


def save_final(cfg: TrainConfig, run: RunFolder, trainer: InspectTrainer, processor: Any, base: ModelFolder) -> Path:
    """Write the adapter (or full model) to a temporary folder, then rename it into place. A full model is a
    model folder of its own: the processor, the base's other files and the run's settings go with it."""
    final = run.output(cfg.method)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        (tmp / "training_args.bin").unlink(missing_ok=True)
        if cfg.method == "full":
            processor.save_pretrained(tmp)
            base.copy_side_files(tmp)
            run.describe_model(tmp)
        os.replace(tmp, final)
        console.print(f"[green]done:[/] {final}")
    return final

"""A run's plan: how many optimizer steps, epochs and warmup steps, and the learning-rate factor of each step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlm_inspect.config import TrainConfig


@dataclass
class Plan:
    samples: int
    world_size: int
    batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_steps: int
    save_steps: int

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size


def make_plan(cfg: TrainConfig, samples: int, world_size: int, batch_size: int) -> Plan:
    """Steps, epochs and warmup: with epochs unset, enough passes to reach min_steps."""
    steps_per_epoch = max(1, math.ceil(samples / (batch_size * world_size)) // cfg.grad_accum)
    if cfg.epochs is None:
        total = max(cfg.min_steps, steps_per_epoch)
        epochs = total / steps_per_epoch
    else:
        total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
        epochs = cfg.epochs
    warmup = math.ceil(cfg.warmup_ratio * total) if cfg.warmup_ratio > 0 else 0
    save_steps = max(1, math.ceil(cfg.save_fraction * total))
    return Plan(samples, world_size, batch_size, cfg.grad_accum, steps_per_epoch, total, epochs, warmup, save_steps)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Learning-rate multiplier. Warmup starts above 0, so no optimizer step is wasted at lr 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0

"""`vlm-inspect train`: LoRA, QLoRA or full fine-tuning with the transformers Trainer + PEFT.

The same code runs on CPU, one GPU, or N processes under `accelerate launch` (shipped
configs chosen by name with `--distributed`). Tiny data gets a meaningful number of steps
and never an optimizer step at learning rate 0 (see README: "Training on ten photos").

Run as: vlm-inspect train --model MODEL --data DATASET --out RUN [key=value ...]
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from vlm_inspect.config import TrainConfig, image_budget_problems, require, save_config
from vlm_inspect.errors import ConfigError, OutputExistsError, VlmInspectError
from vlm_inspect.folders import DatasetFolder, ModelFolder, RunFolder
from vlm_inspect.outputs import check_inputs_exist, check_replaceable, is_ours, remove_tree, set_aside, settle_leftovers
from vlm_inspect.training.plan import make_plan


def validate(cfg: TrainConfig) -> None:
    """Raise one ConfigError listing every problem with the settings."""
    problems = require(cfg, "model", "data", "out")
    if cfg.lora_r < 1 or cfg.lora_alpha <= 0:
        problems.append("lora_r and lora_alpha must be positive")
    if not 0 <= cfg.lora_dropout < 1:
        problems.append(f"lora_dropout: {cfg.lora_dropout} is not in [0, 1)")
    if cfg.lr <= 0 or cfg.projector_lr < 0:
        problems.append("lr must be positive and projector_lr not negative")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"warmup_ratio: {cfg.warmup_ratio} is not in [0, 1)")
    if cfg.epochs is not None and cfg.epochs <= 0:
        problems.append(f"epochs: {cfg.epochs} must be positive")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        problems.append(f"batch_size: {cfg.batch_size} must be at least 1")
    if cfg.grad_accum < 1 or cfg.min_steps < 1 or cfg.max_length < 16:
        problems.append("grad_accum and min_steps must be at least 1, max_length at least 16")
    if not 0 < cfg.save_fraction <= 1:
        problems.append(f"save_fraction: {cfg.save_fraction} is not in (0, 1]")
    if cfg.gpus is not None and not all(g.strip().isdigit() for g in cfg.gpus.split(",")):
        problems.append(f"gpus: {cfg.gpus!r} is not a comma-separated list of GPU ids like 0,2")
    if cfg.train_vision_tower and cfg.method != "full":
        problems.append("train_vision_tower needs method=full")
    problems += image_budget_problems(cfg.image_max_tokens)
    if cfg.precision == "fp8" and cfg.method != "lora":
        problems.append(f"precision: fp8 keeps a frozen base in FP8 under LoRA; it needs method=lora, not {cfg.method}")
    if cfg.resume and cfg.overwrite:
        problems.append("resume and overwrite contradict each other; pick one")
    if problems:
        raise ConfigError(problems)


def train(cfg: TrainConfig) -> Path:
    """Fine-tune and write RUN/ (adapter/ or model/, config.yaml, dataset.json, reference/ when the dataset has
    known-good references, metrics.jsonl, checkpoints/).

    The model folder (its processor probed on one photo) and the dataset are checked before `out` is touched.

    Returns:
        The run folder.
    """
    from vlm_inspect.models.load import load_processor

    validate(cfg)
    check_inputs_exist({"model": cfg.model, "data": cfg.data})
    model, data = ModelFolder.open(cfg.model), DatasetFolder.open(cfg.data)
    samples = data.samples()
    cfg = resolved(cfg, model)
    processor = load_processor(model, cfg.image_max_tokens)  # its template and image processor probed, before OUT
    run = RunFolder(Path(cfg.out))
    if cfg.distributed and "LOCAL_RANK" not in os.environ:
        previous = prepare_run_folder(cfg, run, data)
        return finish_replacing(launch_distributed(cfg, run), previous)
    select_gpus(cfg.gpus)  # before anything asks CUDA about devices
    if cfg.method == "qlora" and not _cuda_available():
        raise ConfigError(["method: qlora needs a CUDA GPU (bitsandbytes 4-bit); use method=lora on this machine"])
    previous = prepare_run_folder(cfg, run, data) if "LOCAL_RANK" not in os.environ else None
    return finish_replacing(_train_in_process(cfg, run, model, data, samples, processor), previous)


def resolved(cfg: TrainConfig, model: ModelFolder) -> TrainConfig:
    """The settings with the run's image-token budget fixed (the family's default when unset), so the saved
    config, and every later verb that reads it, uses the resolution this run was trained at."""
    if cfg.image_max_tokens is not None:
        return cfg
    return dataclasses.replace(cfg, image_max_tokens=model.family.default_image_max_tokens)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_run_folder(cfg: TrainConfig, run: RunFolder, data: DatasetFolder) -> Path | None:
    """Refuse to clobber a run unless told; write the resolved config, the dataset's facts and its references.

    Returns the previous run set aside by --overwrite (`.RUN.old-PID`), to delete once the new one is done.
    """
    folder = run.path
    for line in settle_leftovers(folder):
        print(line, flush=True)
    if cfg.resume and folder.exists() and any(folder.iterdir()):
        from vlm_inspect.training.checkpoints import check_resume

        check_resume(cfg, run)  # the saved config.yaml stays as the run started
        return None
    started = folder.exists() and any(folder.iterdir())
    previous = None
    if started and cfg.overwrite:
        check_replaceable(folder, True, [cfg.model, cfg.data])
        previous = set_aside(folder)
    elif run.is_finished():
        raise OutputExistsError(f"{folder}: holds a finished run; pass --overwrite to replace it or pick another --out")
    elif started and (run.checkpoints_path.exists() or is_ours(folder)):
        raise OutputExistsError(f"{folder}: holds an unfinished run; pass --resume to continue it or --overwrite")
    elif started:
        raise OutputExistsError(f"{folder}: exists and is not empty; pick another --out or pass --overwrite")
    elif cfg.resume:
        raise OutputExistsError(f"{folder}: no run to resume here; drop --resume to start one")
    folder.mkdir(parents=True, exist_ok=True)
    data.facts().write(run.dataset_path)
    run.keep_reference(data)  # what every later verb judges photos against by default
    save_config(cfg, folder)
    return previous


def finish_replacing(run: Path, previous: Path | None) -> Path:
    """Delete the run that --overwrite set aside, now that its replacement is complete."""
    if previous is not None:
        remove_tree(previous)
    return run


def select_gpus(gpus: str | None) -> None:
    """Make only the chosen GPUs visible; must run before CUDA starts in this process."""
    if gpus is None or "LOCAL_RANK" in os.environ:
        return  # under accelerate launch the launcher already set the visible devices
    import torch

    if torch.cuda.is_initialized():
        raise VlmInspectError("gpus must be chosen before CUDA starts; call train() in a fresh process")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus


def accelerate_config_path(name: str, suffix: str = ".yaml") -> Path:
    """The shipped accelerate config for ddp, zero2, zero3 or fsdp (or, with suffix .json, its DeepSpeed file)."""
    return Path(str(resources.files("vlm_inspect") / "configs" / "accelerate" / f"{name}{suffix}"))


def launch_distributed(cfg: TrainConfig, run: RunFolder) -> Path:
    """Run this same training code in N processes through `accelerate launch`."""
    import torch

    gpu_ids = cfg.gpus.split(",") if cfg.gpus else [str(i) for i in range(torch.cuda.device_count())]
    cuda = torch.cuda.is_available()
    processes = len(gpu_ids) if cuda else int(os.environ.get("VLM_INSPECT_CPU_PROCESSES", "2"))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config_path(cfg.distributed)),
    ]
    deepspeed_file = accelerate_config_path(cfg.distributed, ".json")
    if deepspeed_file.exists():  # settings accelerate's YAML cannot hold; a path given here needs no cwd
        cmd += ["--deepspeed_config_file", str(deepspeed_file)]
    cmd += ["--num_processes", str(processes), "--main_process_port", str(_free_port())]
    if cuda:  # on CPU the same config runs N gloo processes through torchrun
        cmd += ["--gpu_ids", ",".join(gpu_ids)]
    # A resume keeps the run's config.yaml as it started; the settings it may change travel in a file of their own.
    settings = save_config(cfg, run.path, ".resume-config.yaml") if cfg.resume else run.config_path
    cmd += ["-m", "vlm_inspect.train", str(settings)]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled" if cfg.report_to != "wandb" else "")}
    result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        raise VlmInspectError(f"distributed training failed (exit {result.returncode}); see the log above")
    return run.path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ in-process training


def _train_in_process(
    cfg: TrainConfig,
    run: RunFolder,
    model_folder: ModelFolder,
    data: DatasetFolder,
    samples: list[dict],
    processor: Any = None,
) -> Path:
    import torch
    from accelerate import PartialState
    from transformers import set_seed

    from vlm_inspect.data.dataset import Collator, ConversationDataset
    from vlm_inspect.models.load import load_processor, resolve_dtype
    from vlm_inspect.training.loop import build_trainer, print_plan, save_final
    from vlm_inspect.training.memory import choose_batch_size
    from vlm_inspect.training.model import build_model

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo across CPU processes
    set_seed(cfg.seed)  # before the model: LoRA's A matrices are drawn at creation
    device = state.device
    dtype = resolve_dtype(cfg.precision, device)
    family = model_folder.family
    processor = processor or load_processor(model_folder, cfg.image_max_tokens)
    model, trainable = build_model(cfg, model_folder, dtype, device)
    dataset = ConversationDataset(
        samples,
        data.image_root,
        processor,
        max_length=cfg.max_length,
        family=family,
        image_aspect=cfg.image_aspect,
        augment=cfg.augment,
        seed=cfg.seed,
        locate_questions=data.facts().locate_wordings(),
    )
    family.check_side_inputs(model, dataset[0], model_folder.path)
    batch_size, checkpointing = choose_batch_size(cfg, model, dataset, device)
    plan = make_plan(cfg, len(dataset), state.num_processes, batch_size)
    if state.is_main_process:
        longest = dataset.lengths.index(max(dataset.lengths))
        print_plan(cfg, plan, trainable, model, device, dtype, checkpointing, dataset.image_tokens[longest])
    resume_from = run.latest_complete_checkpoint() if cfg.resume else None
    trainer = build_trainer(
        cfg, run, model, dataset, Collator(processor.tokenizer.pad_token_id), plan, dtype, checkpointing
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    save_final(cfg, run, trainer, processor, model_folder)  # every process: DeepSpeed gathers weights to save
    state.wait_for_everyone()
    return run.path


def main(argv: list[str] | None = None) -> None:
    """Entry of each process under `accelerate launch`: read the resolved config and train."""
    from vlm_inspect.config import load_saved_config

    args = argv if argv is not None else sys.argv[1:]
    cfg = load_saved_config(TrainConfig, args[0])
    cfg.resume = cfg.resume or bool(json.loads(os.environ.get("VLM_INSPECT_RESUME", "false")))
    try:
        select_gpus(None)
        data = DatasetFolder.open(cfg.data)
        _train_in_process(cfg, RunFolder(Path(cfg.out)), ModelFolder.open(cfg.model), data, data.samples())
    except VlmInspectError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

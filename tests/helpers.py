"""Helpers several test modules share: the LLaVA-1.5 prompt as the original repo writes it, and run folders made
without training."""

from __future__ import annotations

from pathlib import Path

IMAGE = "<image>"


def llava_prompt(question: str, history: list[tuple[str, str]] | None = None, eos: str = "</s>") -> str:
    """The text before LLaVA-1.5's next answer, written out by hand as `conv_vicuna_v1` renders it:
    `USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {next question} ASSISTANT:`. Tests hold our chat
    template and the converted checkpoints against it."""
    turns = [*(history or []), (question, None)]
    parts = []
    for i, (q, a) in enumerate(turns):
        q = q.replace(IMAGE, "").strip()
        parts.append(f"USER: {IMAGE}\n{q} " if i == 0 else f"USER: {q} ")
        parts.append("ASSISTANT:" if a is None else f"ASSISTANT: {a}{eos}")
    return "".join(parts)


def make_run(
    folder: Path, base: Path, data: Path | str, method: str = "lora", seed: int = 0, metrics=None, **settings
) -> Path:
    """A run folder as `train` leaves it, made in a second without training: adapter/ (LoRA on every language
    linear and the projector, each moved away from its start as training would), config.yaml, dataset.json, the
    dataset's references (reference/) and, when given, metrics.jsonl rows (written as they are, so a test can add a torn last line). `settings` are
    more of the run's TrainConfig (e.g. image_max_tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from vlm_inspect.config import TrainConfig, save_config
    from vlm_inspect.errors import DataError
    from vlm_inspect.folders import DatasetFacts, DatasetFolder, RunFolder
    from vlm_inspect.models.families import family_of_model
    from vlm_inspect.models.family import LORA_TARGETS
    from vlm_inspect.models.load import load_model

    run = RunFolder(Path(folder))
    model = load_model(base, dtype="fp32", device="cpu")
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS, modules_to_save=[family_of_model(model).projector]
    )
    tuned = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    tuned.save_pretrained(run.path / RunFolder.ADAPTER)
    cfg = TrainConfig(model=str(base), data=str(data), out=str(run.path), method=method, **settings)  # type: ignore[arg-type]
    save_config(cfg, run.path)
    try:
        dataset = DatasetFolder.open(data)
        facts = dataset.facts()
        run.keep_reference(dataset)  # as train keeps the dataset's references
    except DataError:  # a test's run whose data is gone on purpose
        facts = DatasetFacts()
    facts.write(run.dataset_path)
    if metrics is not None:
        run.metrics_path.write_text(metrics)
    return run.path

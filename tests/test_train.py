"""`vlm-inspect train` on the tiny model: the real command and config, tiny model swapped in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlm_inspect.cli import app
from vlm_inspect.config import TrainConfig
from vlm_inspect.data.dataset import IGNORE_INDEX, Collator, ConversationDataset, load_training_dataset
from vlm_inspect.errors import ConfigError, DataError, OutputExistsError
from vlm_inspect.folders import RunFolder
from vlm_inspect.models.families import family_named
from vlm_inspect.models.load import load_processor
from vlm_inspect.train import train, validate
from vlm_inspect.training.plan import lr_factor, make_plan

FAST = ["lora_r=8", "lora_alpha=16", "lr=1e-2", "projector_lr=2e-3", "lora_dropout=0", "save_total_limit=20"]
runner = CliRunner()


def run_cli(*args: str) -> None:
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ plan and schedule


def test_ten_photos_get_many_steps_and_no_step_at_lr_zero():
    cfg = TrainConfig(model="m", data="d", out="o", batch_size=16)
    plan = make_plan(cfg, samples=10, world_size=1, batch_size=16)
    assert plan.total_steps >= 100 and plan.epochs >= 100
    factors = [lr_factor(s, plan.warmup_steps, plan.total_steps, "cosine") for s in range(plan.total_steps)]
    assert min(factors) > 0 and max(factors) == 1.0
    fixed = make_plan(TrainConfig(model="m", data="d", out="o", epochs=2), samples=10, world_size=2, batch_size=1)
    assert fixed.total_steps == 10 and fixed.effective_batch == 2


def test_validation_lists_every_problem():
    cfg = TrainConfig(lora_r=0, lr=-1, warmup_ratio=2, gpus="0;1", resume=True, overwrite=True)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert len(info.value.problems) == 8  # model, data, out + 5 bad values


# ------------------------------------------------------------------ labels


def test_loss_covers_only_answers_and_end_of_turn(tiny_model_dir: Path, spot_dataset: Path):
    processor = load_processor(tiny_model_dir)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    turns = [("<image>\nIs this box OK or NG?", "NG. A black spot."), ("Describe the defects.", "A spot, top left.")]
    sample = {
        "id": "x",
        "image": "images/001.png",
        "conversations": [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))],
    }
    item = ConversationDataset([sample], spot_dataset, processor, max_length=512, family=family_named("llava"))[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert len(ids) == len(labels) == len(item["attention_mask"])
    assert ids.count(image_id) == 64 and all(
        lab == IGNORE_INDEX for i, lab in zip(ids, labels, strict=True) if i == image_id
    )
    supervised = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(supervised) == " NG. A black spot.</s> A spot, top left.</s>"
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX and ids[-1] == tok.eos_token_id
    # the whole text tokenised at once is what inference sees: the ids must match it
    text = "USER: <image>\nIs this box OK or NG? ASSISTANT: NG. A black spot.</s>"
    expected = tok(text)["input_ids"]
    collapsed = [i for k, i in enumerate(ids) if i != image_id or ids[k - 1] != image_id]
    assert collapsed[: len(expected)] == expected


def test_too_long_sample_is_an_error_naming_it(tiny_model_dir: Path, spot_dataset: Path):
    processor = load_processor(tiny_model_dir)
    with pytest.raises(DataError, match=r"s0 \(\d+ tokens\)"):
        load_training_dataset(spot_dataset, processor, family_named("llava"), max_length=70)


# ------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, spot_dataset: Path) -> Path:
    run = tmp_path_factory.mktemp("runs") / "lora"
    run_cli("--model", str(tiny_model_dir), "--data", str(spot_dataset), "--out", str(run), "min_steps=60", *FAST)
    return run


@pytest.mark.integration
def test_run_folder_describes_itself(lora_run: Path):
    assert {p.name for p in lora_run.iterdir()} >= {"adapter", "config.yaml", "metrics.jsonl", "checkpoints"}
    assert (lora_run / "adapter" / "adapter_model.safetensors").exists()
    checkpoints = sorted((lora_run / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) >= 5  # every ~10% of the run


@pytest.mark.integration
def test_loss_falls(lora_run: Path):
    losses = [r["loss"] for r in read_metrics(lora_run) if "loss" in r]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


@pytest.mark.integration
def test_metrics_rows_carry_elapsed_seconds(lora_run: Path):
    seconds = [r["seconds"] for r in read_metrics(lora_run) if "loss" in r]
    assert len(seconds) == 60 and seconds[0] > 0
    assert all(later >= earlier for earlier, later in zip(seconds, seconds[1:], strict=False))


@pytest.mark.integration
def test_lora_and_projector_change_base_does_not(lora_run: Path, tiny_model_dir: Path, spot_dataset: Path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base_before = load_file(tiny_model_dir / "model.safetensors")
    adapter = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero
    assert not any("vision_tower" in k for k in adapter)
    trained_proj = next(v for k, v in adapter.items() if "multi_modal_projector.linear_1.weight" in k)
    assert not torch.equal(base_before["multi_modal_projector.linear_1.weight"], trained_proj)
    # with the adapter switched off, the tuned model is bit for bit the base model
    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    tuned = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), lora_run / "adapter"
    )
    processor = load_processor(tiny_model_dir)
    dataset = load_training_dataset(spot_dataset, processor, family_named("llava"), max_length=512)
    batch = {k: v for k, v in Collator(processor.tokenizer.pad_token_id)([dataset[1]]).items() if k != "labels"}
    with torch.no_grad():
        base_logits = base(**batch).logits
        with tuned.disable_adapter():
            off_logits = tuned.eval()(**batch).logits
        on_logits = tuned(**batch).logits
    assert torch.equal(base_logits, off_logits)
    assert not torch.allclose(base_logits, on_logits, atol=1e-3)


@pytest.mark.integration
def test_finished_run_is_not_overwritten(lora_run: Path, tiny_model_dir: Path, spot_dataset: Path):
    mtime = (lora_run / "adapter" / "adapter_model.safetensors").stat().st_mtime
    with pytest.raises(OutputExistsError, match="finished run"):
        train(TrainConfig(model=str(tiny_model_dir), data=str(spot_dataset), out=str(lora_run)))
    assert (lora_run / "adapter" / "adapter_model.safetensors").stat().st_mtime == mtime


def _train_cmd(model: Path, data: Path, run: Path, *extra: str) -> list[str]:
    cli = [sys.executable, "-m", "vlm_inspect.cli", "train", "--model", str(model), "--data", str(data)]
    return [*cli, "--out", str(run), "min_steps=30", "save_fraction=0.1", *FAST, *extra]


@pytest.mark.integration
def test_killed_run_resumes_to_the_same_adapter(tmp_path: Path, tiny_model_dir: Path, spot_dataset: Path):
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(tiny_model_dir, spot_dataset, whole), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(tiny_model_dir, spot_dataset, killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not list(killed.glob("checkpoints/checkpoint-9/checkpoint-complete")) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"
    subprocess.run([*_train_cmd(tiny_model_dir, spot_dataset, killed), "--resume"], check=True, capture_output=True)
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    steps = [r["step"] for r in read_metrics(killed) if "loss" in r]
    assert steps == list(range(1, 31))  # no duplicated or missing rows after resume


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_two_processes_match_one_at_equal_global_batch(tmp_path: Path, tiny_model, spot_dataset: Path, family: str):
    """What the CPUs allow of `--distributed` (issue #30): 2 gloo processes train the same adapter as one, for
    LLaVA-1.5 and for Qwen2.5-VL (dynamic image tokens, M-RoPE side inputs padded by the collator)."""
    # every step sees the whole dataset, so both runs average the same gradients
    model = tiny_model(family)
    common = ["--no-augment", "epochs=4", "image_max_tokens=64"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([*_train_cmd(model, spot_dataset, one), *common, "batch_size=16"], check=True)
    env = {**os.environ, "VLM_INSPECT_CPU_PROCESSES": "2"}
    subprocess.run(
        [*_train_cmd(model, spot_dataset, two), *common, "batch_size=8", "--distributed", "ddp"],
        check=True,
        env=env,
    )
    loss_one = [r["loss"] for r in read_metrics(one) if "loss" in r]
    loss_two = [r["loss"] for r in read_metrics(two) if "loss" in r]
    assert len(loss_one) == len(loss_two) == 4
    assert loss_one[0] == pytest.approx(loss_two[0], rel=2e-2)
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=5e-2, atol=5e-3, msg=key)


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp"])
def test_launcher_gets_the_shipped_config_by_name(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import yaml

    from vlm_inspect import train as train_module

    launched: list[list[str]] = []
    monkeypatch.setattr(
        train_module.subprocess, "run", lambda cmd, **kw: launched.append(cmd) or subprocess.CompletedProcess(cmd, 0)
    )
    cfg = TrainConfig(model="m", data="d", out=str(tmp_path), distributed=name)
    train_module.launch_distributed(cfg, RunFolder(tmp_path))
    cmd = launched[0]
    config = Path(cmd[cmd.index("--config_file") + 1])
    assert config.name == f"{name}.yaml" and config.exists()
    if name == "zero3":  # ZeRO settings accelerate's YAML cannot hold come from the shipped JSON
        deepspeed_file = Path(cmd[cmd.index("--deepspeed_config_file") + 1])
        settings = json.loads(deepspeed_file.read_text())
        assert settings["zero_optimization"]["stage"] == 3
        # accelerate refuses a config file next to these YAML keys
        launcher = yaml.safe_load(config.read_text())
        yaml_keys = set(launcher) | set(launcher["deepspeed_config"])
        assert not yaml_keys & {"mixed_precision", "zero_stage", "gradient_accumulation_steps", "gradient_clipping"}
    else:
        assert "--deepspeed_config_file" not in cmd
    assert cmd[-2:] == ["vlm_inspect.train", str(tmp_path / "config.yaml")]


def test_layers_compile_on_gpus_except_under_zero3_for_families_measured():
    from vlm_inspect.models.families import family_named
    from vlm_inspect.training.loop import use_compile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    llava, gemma = family_named("llava"), family_named("gemma3")
    for name in (None, "ddp", "zero2", "fsdp"):
        assert use_compile(TrainConfig(distributed=name), cuda, llava)
        assert not use_compile(TrainConfig(distributed=name), cpu, llava)
        assert not use_compile(TrainConfig(distributed=name), cuda, gemma)  # not measured: off unless asked
    assert not use_compile(TrainConfig(distributed="zero3"), cuda, llava)
    assert use_compile(TrainConfig(distributed="zero3", compile=True), cuda, llava)
    assert use_compile(TrainConfig(compile=True), cuda, gemma)
    assert use_compile(TrainConfig(), cuda, family_named("qwen2_5_vl"))  # measured on the 7B shape


def test_qlora_without_cuda_is_a_clear_error(tiny_model_dir: Path, spot_dataset: Path, tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(spot_dataset), out=str(tmp_path / "q"), method="qlora")
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        train(cfg)


@pytest.mark.integration
def test_tensorboard_only_when_asked(tiny_model_dir: Path, spot_dataset: Path, tmp_path: Path):
    pytest.importorskip("tensorboard")
    common = ["--model", str(tiny_model_dir), "--data", str(spot_dataset), "min_steps=2", "lora_r=4", "lora_alpha=8"]
    run_cli("--out", str(tmp_path / "tb"), "--report-to", "tensorboard", *common)
    assert list((tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*"))
    run_cli("--out", str(tmp_path / "plain"), *common)
    assert not (tmp_path / "plain" / "tensorboard").exists()
    assert (tmp_path / "plain" / "metrics.jsonl").exists()


@pytest.mark.integration
def test_console_shows_the_progress_bar_not_raw_log_dicts(
    tmp_path: Path, tiny_model_dir: Path, spot_dataset: Path, capfd: pytest.CaptureFixture
):
    train(TrainConfig(model=str(tiny_model_dir), data=str(spot_dataset), out=str(tmp_path / "run"), min_steps=3))
    printed = "".join(capfd.readouterr())
    assert "{'loss'" not in printed and "'grad_norm'" not in printed
    assert len(read_metrics(tmp_path / "run")) >= 3  # the rows are still kept

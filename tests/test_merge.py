"""`vlm-inspect merge`: adapters folded into the tiny base, checked on probes, saved as llava-hf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from PIL import Image, ImageDraw
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration
from typer.testing import CliRunner

import vlm_inspect.merge as merge_module
from helpers import llava_prompt as render_prompt
from helpers import make_run
from vlm_inspect.cli import app
from vlm_inspect.config import MergeConfig, TrainConfig, save_config
from vlm_inspect.errors import ConfigError, ModelFolderError, OutputExistsError
from vlm_inspect.merge import merge, probe_inputs
from vlm_inspect.models.adapter import attach_adapter
from vlm_inspect.models.families import family_named
from vlm_inspect.models.load import load_model, load_processor

LANGUAGE_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
QUESTION = "Is the box OK or defective?"


def box_photo(defect: bool) -> Image.Image:
    image = Image.new("RGB", (96, 72), (230, 230, 226))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 12, 76, 60), fill=(250, 250, 250))
    if defect:
        draw.ellipse((26, 16, 36, 26), fill=(20, 20, 20))
    return image


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepare-style dataset folder: train.json (images relative to it) and its manifest."""
    folder = tmp_path_factory.mktemp("data") / "boxes"
    (folder / "images").mkdir(parents=True)
    records = []
    for i, defect in enumerate([True, False, True]):
        name = f"images/{'ng' if defect else 'ok'}_{i}.png"
        box_photo(defect).save(folder / name)
        answer = "NG. There is a black spot near the top left corner of the box." if defect else "OK."
        conversation = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]
        records.append({"id": str(i), "image": name, "conversations": conversation})
    (folder / "train.json").write_text(json.dumps(records))
    (folder / "manifest.json").write_text(json.dumps({"language": "en", "product": "box"}))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, dataset: Path) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "boxes-lora", tiny_model_dir, dataset)


def logits(model, processor, question: str = QUESTION, defect: bool = True) -> torch.Tensor:
    text = render_prompt(question) + " NG. There is a black spot."
    inputs = processor(images=box_photo(defect), text=text, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_fp32_merge_is_a_plain_llava_hf_folder_that_answers_like_the_adapter(
    tmp_path: Path, tiny_model_dir: Path, run: Path, capsys
):
    out = merge(MergeConfig(model=str(tiny_model_dir), adapter=str(run), out=str(tmp_path / "merged"), dtype="fp32"))
    processor = AutoProcessor.from_pretrained(out)
    merged = LlavaForConditionalGeneration.from_pretrained(out)
    adapter = attach_adapter(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), run)
    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    ours = logits(merged, processor)
    torch.testing.assert_close(ours, logits(adapter, processor), rtol=0, atol=1e-4)
    assert (ours - logits(base, processor)).abs().max() > 1e-2  # the adapter really changed the model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == render_prompt(QUESTION)
    assert yaml.safe_load((out / "config.yaml").read_text())["kind"] == "MergeConfig"
    assert (out / "train_config.yaml").read_text() == (run / "config.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary sibling left
    printed = " ".join(capsys.readouterr().out.split())
    assert "training sample(s) of" in printed and "largest logit difference" in printed


def test_peft_merge_equivalence(tiny_model_dir: Path, run: Path):
    """Adapter ≈ merged; unloading without merging drops the LoRA but keeps the trained projector.

    PEFT's `unload()` swaps each modules_to_save wrapper for its trained copy, so the unloaded
    model is the base with the run's projector, not the base: `disable_adapter()` gives the base.
    """
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    base_logits = logits(base, processor)
    adapter = attach_adapter(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), run)
    adapter_logits = logits(adapter, processor)
    with adapter.disable_adapter():
        assert torch.equal(logits(adapter, processor), base_logits)
    projector = {k: v.clone() for k, v in adapter.base_model.model.model.multi_modal_projector.state_dict().items()}
    merged_logits = logits(adapter.merge_and_unload(), processor)
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-4)
    assert (adapter_logits - base_logits).abs().max() > 1e-2
    unloaded = attach_adapter(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), run).unload()
    base.model.multi_modal_projector.load_state_dict(
        {k.replace("modules_to_save.default.", ""): v for k, v in projector.items() if "original_module" not in k}
    )
    assert torch.equal(logits(unloaded, processor), logits(base, processor))


def test_default_bf16_merge_saves_bf16_weights(tmp_path: Path, tiny_model_dir: Path, run: Path):
    out = merge(MergeConfig(model=str(tiny_model_dir), adapter=str(run / "adapter"), out=str(tmp_path / "m")))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    # Given RUN/adapter rather than RUN, the run's config is still found and kept.
    assert (out / "train_config.yaml").exists()
    processor = AutoProcessor.from_pretrained(out)
    merged = load_model(out, dtype="fp32", device="cpu")
    adapter = attach_adapter(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), run)
    diff = (logits(merged, processor) - logits(adapter, processor)).abs().max()
    assert 0 < diff < 0.1


def test_a_merge_that_changes_the_answers_fails_and_leaves_nothing(
    tmp_path: Path, tiny_model_dir: Path, run: Path, monkeypatch
):
    real = merge_module.merge_weights

    def corrupted(model):
        merged = real(model)
        with torch.no_grad():
            merged.model.language_model.layers[0].mlp.down_proj.weight.mul_(3.0)
        return merged

    monkeypatch.setattr(merge_module, "merge_weights", corrupted)
    out = tmp_path / "merged"
    with pytest.raises(ModelFolderError, match=r"merge check failed: .* differ .* by up to [\d.]+ \(allowed for fp32"):
        merge(MergeConfig(model=str(tiny_model_dir), adapter=str(run), out=str(out), dtype="fp32"))
    assert list(tmp_path.iterdir()) == []


def test_qlora_run_is_merged_onto_the_unquantized_base(tmp_path: Path, tiny_model_dir: Path, dataset: Path, capsys):
    run = make_run(tmp_path / "qlora-run", tiny_model_dir, dataset, method="qlora", seed=1)
    out = merge(MergeConfig(model=str(tiny_model_dir), adapter=str(run), out=str(tmp_path / "m"), dtype="fp32"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = LlavaForConditionalGeneration.from_pretrained(out)
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    assert "merged onto the unquantized base" in " ".join(capsys.readouterr().out.split())


def test_probes_come_from_the_run_dataset_else_a_drawn_image(dataset: Path, tmp_path: Path, tiny_model_dir: Path):
    processor = load_processor(tiny_model_dir)
    probes = probe_inputs(TrainConfig(data=str(dataset)), processor)
    assert len(probes.images) == 2 and "train.json" in probes.source
    assert probes.texts[0] == (
        f"USER: <image>\n{QUESTION} ASSISTANT: NG. There is a black spot near the top left corner of the box.</s>"
    )
    assert probe_inputs(TrainConfig(data=str(dataset / "train.json")), processor).texts == probes.texts
    for config in (None, TrainConfig(data=str(tmp_path / "moved-away"))):
        fallback = probe_inputs(config, processor)
        assert fallback.texts == [render_prompt("Is this product OK or NG?")] and "drawn" in fallback.source


def test_output_and_setting_rules(tmp_path: Path, tiny_model_dir: Path, run: Path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError):
        merge(MergeConfig(model=str(tiny_model_dir), adapter=str(run), out=str(out)))
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(ConfigError) as err:
        merge(MergeConfig(model=str(tiny_model_dir), adapter="", out=str(tiny_model_dir)))
    assert err.value.problems[0] == "adapter: required" and "also an input" in err.value.problems[1]
    with pytest.raises(ModelFolderError, match="no adapter_config.json"):
        merge(MergeConfig(model=str(tiny_model_dir), adapter=str(tmp_path), out=str(tmp_path / "x")))


def test_cli_merges(tmp_path: Path, tiny_model_dir: Path, run: Path):
    out = tmp_path / "merged"
    args = ["merge", "--model", str(tiny_model_dir), "--adapter", str(run), "--out", str(out), "--dtype", "fp32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "already exists" in " ".join(result.output.split())


@pytest.mark.gpu
def test_qlora_adapter_merges_onto_the_unquantized_base_on_gpu(tmp_path: Path, tiny_model_dir: Path, dataset: Path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quantized = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=family_named(
            "llava"
        ).qlora_keep_unquantized(),  # full-path prefixes keep the projector in bf16
    )
    base4 = load_model(tiny_model_dir, dtype="bf16", device="cuda", quantization_config=quantized)
    assert any(type(m).__name__ == "Linear4bit" for m in base4.modules())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_LINEARS, modules_to_save=["multi_modal_projector"])
    tuned = get_peft_model(base4, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.device, p.dtype))
    run = tmp_path / "qlora-run"
    tuned.save_pretrained(run / "adapter")
    save_config(TrainConfig(model=str(tiny_model_dir), data=str(dataset), out=str(run), method="qlora"), run)
    out = merge(MergeConfig(model=str(tiny_model_dir), adapter=str(run), out=str(tmp_path / "m"), dtype="bf16"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = load_model(out, dtype="bf16", device="cuda")
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    unquantized = attach_adapter(load_model(tiny_model_dir, dtype="bf16", device="cuda"), run)
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=box_photo(True), text=render_prompt(QUESTION), return_tensors="pt").to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        a, b = merged(**inputs).logits.float(), unquantized(**inputs).logits.float()
    assert (a - b).abs().max() <= 0.1 * max(1.0, b.abs().max().item())


_KILLED_AT_THE_CHECK = r"""
import os, signal, sys
import vlm_inspect.merge as m
from vlm_inspect.config import MergeConfig
m._compare = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # dies after saving, before the logit check ends
m.merge(MergeConfig(model=sys.argv[1], adapter=sys.argv[2], out=sys.argv[3], dtype="fp32"))
"""


@pytest.mark.integration  # seconds: CI runs it, the unit loop leaves it out
def test_a_merge_killed_before_its_check_leaves_no_loadable_model_at_out(
    tmp_path: Path, tiny_model_dir: Path, run: Path
):
    import os
    import subprocess
    import sys

    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _KILLED_AT_THE_CHECK, str(tiny_model_dir), str(run), str(out)]
    assert subprocess.run(command, env=env, check=False).returncode == -9
    assert not out.exists()
    (partial,) = tmp_path.iterdir()  # the unverified weights sit in a hidden sibling only
    assert partial.name.startswith(".merged.partial-") and (partial / "model.safetensors").exists()
    merge(MergeConfig(model=str(tiny_model_dir), adapter=str(run), out=str(out), dtype="fp32"))
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the next merge cleaned up after the killed one

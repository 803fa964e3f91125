"""`vlm-inspect convert`: original LLaVA checkpoints and LoRA runs, built in code from the tiny model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from helpers import llava_prompt as render_prompt
from vlm_inspect.cli import app
from vlm_inspect.config import ConvertConfig
from vlm_inspect.convert import convert, grow_rows
from vlm_inspect.errors import ConfigError, ModelFolderError, OutputExistsError
from vlm_inspect.models.adapter import attach_adapter
from vlm_inspect.models.families.common import build_tokenizer

QUESTION = "Is the box OK or defective?"

# ------------------------------------------------------------------ building original layouts


def original_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer as the original repo ships Llama's: no <image>, no <pad> (pad is <unk>)."""
    data = json.loads(build_tokenizer().backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in ("<pad>", "<image>")]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        padding_side="right",
    )


ORIGINAL_VOCAB = len(original_tokenizer())  # the tiny tokenizer's vocabulary before <pad> and <image> are added


def original_tensors(tiny: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The tiny model's language model and projector under the original repo's names."""
    out = {}
    for key, value in tiny.state_dict().items():
        if key.startswith("model.language_model."):
            out["model." + key.removeprefix("model.language_model.")] = value.clone()
        elif key.startswith("model.multi_modal_projector."):
            layer = "0" if ".linear_1." in key else "2"
            out[f"model.mm_projector.{layer}.{key.rsplit('.', 1)[1]}"] = value.clone()
        elif key == "lm_head.weight":
            out[key] = value.clone()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        out[key] = out[key][:ORIGINAL_VOCAB].clone()
    return out


def vision_tensors(tiny: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The tiny vision tower under CLIPModel's names (`vision_model.*`)."""
    return {
        "vision_model." + k.removeprefix("model.vision_tower."): v.clone()
        for k, v in tiny.state_dict().items()
        if k.startswith("model.vision_tower.") and not k.endswith("position_ids")
    }


def original_config(tiny: LlavaForConditionalGeneration) -> dict:
    text = tiny.config.text_config
    return {
        "_name_or_path": "liuhaotian/llava-v1.5-7b",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": ORIGINAL_VOCAB,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "image_aspect_ratio": "pad",
        "mm_hidden_size": tiny.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def write_original(
    folder: Path, tiny: LlavaForConditionalGeneration, tensors: dict | None = None, fmt: str = "bin"
) -> Path:
    """An original-layout LLaVA folder: 2 `.bin` shards with an index, or one model.safetensors."""
    tensors = original_tensors(tiny) if tensors is None else tensors
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(original_config(tiny), indent=2))
    original_tokenizer().save_pretrained(folder)
    if fmt == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    keys = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, names in shards.items():
        torch.save({k: tensors[k] for k in names}, folder / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # The real repo ships this copy of the projector beside the shards; it must not be read twice.
    projector = {k: v for k, v in tensors.items() if "mm_projector" in k}
    torch.save(projector, folder / "mm_projector.bin")
    return folder


def write_clip(folder: Path, tiny: LlavaForConditionalGeneration, vision_only: bool = False, **changes) -> Path:
    """A CLIP folder as openai ships it (CLIPModel with a text tower), or a CLIPVisionModel one."""
    vision_config = tiny.config.vision_config.to_dict() | changes
    if vision_only:
        model = CLIPVisionModel(type(tiny.config.vision_config)(**vision_config))
        state = {k.removeprefix("vision_model."): v for k, v in vision_tensors(tiny).items()}
    else:
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        model = CLIPModel(CLIPConfig(vision_config=vision_config, text_config=text, projection_dim=32))
        state = vision_tensors(tiny)
    if not changes:
        model.load_state_dict(state, strict=False)
    model.save_pretrained(folder)
    return folder


def probe_image() -> Image.Image:
    image = Image.new("RGB", (80, 64), (235, 235, 230))
    ImageDraw.Draw(image).rectangle((20, 12, 40, 30), fill=(20, 20, 20))
    return image


def logits_of(model_dir_or_model, processor, question: str = QUESTION) -> torch.Tensor:
    model = (
        LlavaForConditionalGeneration.from_pretrained(model_dir_or_model)
        if isinstance(model_dir_or_model, Path)
        else model_dir_or_model
    ).eval()
    inputs = processor(images=probe_image(), text=render_prompt(question) + " NG.", return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory, tiny) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("original")
    return write_original(root / "llava-v1.5-tiny", tiny), write_clip(root / "clip-tiny", tiny)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, originals) -> Path:
    llava, clip = originals
    out = tmp_path_factory.mktemp("converted") / "llava-tiny-hf"
    return convert(ConvertConfig(llava=str(llava), vision_tower=str(clip), out=str(out)))


# ------------------------------------------------------------------ original model → llava-hf


def hand_assembled(converted: Path, llava: Path, clip: Path) -> LlavaForConditionalGeneration:
    """The converted config filled, by hand, with the original files' tensors.

    Only the rows added after the original vocabulary come from the converted model.
    """
    original = {}
    for shard in sorted(llava.glob("pytorch_model-*.bin")):
        original.update(torch.load(shard, weights_only=True))
    vision = load_file(str(clip / "model.safetensors"))
    grown = load_file(str(converted / "model.safetensors"))
    model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(converted)).eval()
    state = {
        "model.multi_modal_projector.linear_1.weight": original["model.mm_projector.0.weight"],
        "model.multi_modal_projector.linear_1.bias": original["model.mm_projector.0.bias"],
        "model.multi_modal_projector.linear_2.weight": original["model.mm_projector.2.weight"],
        "model.multi_modal_projector.linear_2.bias": original["model.mm_projector.2.bias"],
        "model.language_model.norm.weight": original["model.norm.weight"],
    }
    for key, value in original.items():
        if key.startswith("model.layers."):
            state["model.language_model." + key.removeprefix("model.")] = value
    for key, value in vision.items():
        if key.startswith("vision_model."):
            state["model.vision_tower." + key.removeprefix("vision_model.")] = value
    embed_key = next(k for k in grown if k.endswith("embed_tokens.weight"))
    head_key = next(k for k in grown if k.endswith("lm_head.weight"))
    state["model.language_model.embed_tokens.weight"] = torch.cat(
        [original["model.embed_tokens.weight"], grown[embed_key][ORIGINAL_VOCAB:]]
    )
    state["lm_head.weight"] = torch.cat([original["lm_head.weight"], grown[head_key][ORIGINAL_VOCAB:]])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == []
    return model


def test_converted_model_gives_the_logits_of_the_original_tensors(converted: Path, originals, tiny, tiny_model_dir):
    llava, clip = originals
    processor = AutoProcessor.from_pretrained(converted)
    ours = logits_of(converted, processor)
    by_hand = logits_of(hand_assembled(converted, llava, clip), processor)
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=1e-6)
    # The tiny model these tensors came from agrees on every token of the original vocabulary.
    tiny_processor = AutoProcessor.from_pretrained(tiny_model_dir)
    torch.testing.assert_close(ours[..., :ORIGINAL_VOCAB], logits_of(tiny, tiny_processor)[..., :ORIGINAL_VOCAB])


def test_converted_folder_has_the_llava_hf_layout(converted: Path, originals):
    config = json.loads((converted / "config.json").read_text())
    assert (
        config["model_type"] == "llava" and config["text_config"]["vocab_size"] == -(-(ORIGINAL_VOCAB + 2) // 64) * 64
    )
    assert (config["image_token_index"], config["pad_token_id"]) == (ORIGINAL_VOCAB, ORIGINAL_VOCAB + 1)
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == 64 and config["text_config"]["rope_parameters"]["rope_theta"] == 10000.0
    processor = AutoProcessor.from_pretrained(converted)
    tok = processor.tokenizer
    assert (
        tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [ORIGINAL_VOCAB, ORIGINAL_VOCAB + 1]
        and tok.pad_token == "<pad>"
    )
    assert processor.image_processor.crop_size == {"height": 64, "width": 64}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == render_prompt(QUESTION)
    inputs = processor(images=probe_image(), text=render_prompt(QUESTION), return_tensors="pt")
    assert int((inputs["input_ids"] == ORIGINAL_VOCAB).sum()) == 64
    assert (converted / "config.yaml").exists()
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no temporary sibling left


def test_new_embedding_rows_sit_near_the_mean_and_are_seeded(converted: Path):
    weights = load_file(str(converted / "model.safetensors"))
    embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    old, new = embed[:ORIGINAL_VOCAB], embed[ORIGINAL_VOCAB:]
    assert new.shape[0] == -(-(ORIGINAL_VOCAB + 2) // 64) * 64 - ORIGINAL_VOCAB and not torch.isnan(new).any()
    mean = old.mean(0)
    assert (new - mean).norm(dim=1).max() < 0.1 * (old - mean).norm(dim=1).median()
    rows = len(embed)
    assert torch.equal(grow_rows(old, rows), grow_rows(old, rows))
    assert not torch.equal(grow_rows(old, rows, seed=1), grow_rows(old, rows))


def test_safetensors_original_and_vision_only_clip_convert_to_the_same_weights(tmp_path, tiny, converted):
    llava = write_original(tmp_path / "orig", tiny, fmt="safetensors")
    clip = write_clip(tmp_path / "clip", tiny, vision_only=True)
    out = convert(ConvertConfig(llava=str(llava), vision_tower=str(clip), out=str(tmp_path / "hf")))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without(tensors: dict, key: str) -> dict:
    return {k: v for k, v in tensors.items() if k != key}


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing projector", r"missing \(1\):\n\s+model\.mm_projector\.2\.bias \(from .*orig\)"),
        ("unknown tensor", r"not recognised \(1\):\n\s+model\.extra_head\.weight \(in .*pytorch_model-0000\d"),
        ("wrong shape", r"wrong shape \(1\):\n\s+model\.norm\.weight in .*: shape \[95\], expected \[96\]"),
        ("truncated", r"model\.safetensors: cannot read the tensors \(truncated"),
        ("wrong clip", r"clip/config\.json: the vision hidden size is 32 but .* expects mm_hidden_size 64"),
        ("not clip", r"clip/config\.json: model_type is 'llama', expected a CLIP folder"),
    ],
)
def test_mismatched_inputs_name_the_file_and_tensors(tmp_path: Path, tiny, case: str, pattern: str):
    tensors = original_tensors(tiny)
    fmt, clip_changes = "bin", {}
    if case == "missing projector":
        tensors = _without(tensors, "model.mm_projector.2.bias")
    elif case == "unknown tensor":
        tensors["model.extra_head.weight"] = torch.zeros(2, 2)
    elif case == "wrong shape":
        tensors["model.norm.weight"] = torch.ones(95)
    elif case in ("truncated", "not clip"):
        fmt = "safetensors"
    elif case == "wrong clip":
        clip_changes = {"hidden_size": 32, "intermediate_size": 64}
    llava = write_original(tmp_path / "orig", tiny, tensors, fmt=fmt)
    clip = write_clip(tmp_path / "clip", tiny, **clip_changes)
    if case == "truncated":
        data = (llava / "model.safetensors").read_bytes()
        (llava / "model.safetensors").write_bytes(data[: len(data) // 2])
    if case == "not clip":
        (clip / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "hf"
    with pytest.raises(ModelFolderError, match=pattern):
        convert(ConvertConfig(llava=str(llava), vision_tower=str(clip), out=str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "orig"]  # nothing written, no temp left


def test_inv_freq_and_clip_text_tower_are_dropped_but_nothing_else(tmp_path, tiny, capsys):
    tensors = original_tensors(tiny) | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(12)}
    llava = write_original(tmp_path / "orig", tiny, tensors)
    clip = write_clip(tmp_path / "clip", tiny)
    convert(ConvertConfig(llava=str(llava), vision_tower=str(clip), out=str(tmp_path / "hf")))
    assert re.search(
        r"dropped on purpose: \d+ tensors \(CLIP text tower and heads, rotary caches\)", capsys.readouterr().out
    )


def test_output_and_setting_rules(tmp_path: Path, originals):
    llava, clip = originals
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert(ConvertConfig(llava=str(llava), vision_tower=str(clip), out=str(out)))
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(OutputExistsError, match="did not make it"):  # --overwrite replaces only our folders
        convert(ConvertConfig(llava=str(llava), vision_tower=str(clip), out=str(out), overwrite=True))
    (out / "config.yaml").write_text("kind: ConvertConfig\n")  # as an earlier convert leaves it
    convert(ConvertConfig(llava=str(llava), vision_tower=str(clip), out=str(out), overwrite=True))
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    with pytest.raises(ConfigError) as err:
        convert(ConvertConfig(llava=str(llava), llava_lora=str(llava), base=str(clip), out=""))
    assert {"out: required", "vision_tower: required with llava"} <= {p.split(" (")[0] for p in err.value.problems}
    with pytest.raises(ConfigError, match="llava or llava_lora: required"):
        convert(ConvertConfig(out=str(tmp_path / "x")))
    with pytest.raises(ModelFolderError, match="already in the llava-hf layout"):
        convert(ConvertConfig(llava=str(out), vision_tower=str(clip), out=str(tmp_path / "again")))


def test_sentencepiece_tokenizer_model_converts(tmp_path: Path, tiny):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["Is the box OK or NG? The box has a scratch near the top left corner."] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    llava = tmp_path / "orig"
    tensors = original_tensors(tiny)
    n = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).get_piece_size()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[key] = tensors[key][:n].clone()
    write_original(llava, tiny, tensors)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (llava / name).unlink(missing_ok=True)
    shutil.copy(tmp_path / "tokenizer.model", llava / "tokenizer.model")
    (llava / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    out = convert(
        ConvertConfig(llava=str(llava), vision_tower=str(write_clip(tmp_path / "clip", tiny)), out=str(tmp_path / "hf"))
    )
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [n, n + 1]
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == -(-(n + 2) // 64) * 64
    inputs = processor(images=probe_image(), text=render_prompt(QUESTION), return_tensors="pt")
    assert LlavaForConditionalGeneration.from_pretrained(out)(**inputs).logits.isfinite().all()


# ------------------------------------------------------------------ original LoRA run → PEFT adapter

LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LAYERS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
R, ALPHA = 4, 8


def original_lora(tiny: LlavaForConditionalGeneration, seed: int = 0) -> tuple[dict, dict]:
    """LoRA tensors and projector of an original-repo run, keyed as its files key them."""
    g = torch.Generator().manual_seed(seed)
    lora, modules = {}, dict(tiny.named_modules())
    for i in range(tiny.config.text_config.num_hidden_layers):
        for name in LAYERS:
            linear = modules[f"model.language_model.layers.{i}.{name}"]
            prefix = f"base_model.model.model.layers.{i}.{name}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(R, linear.in_features, generator=g) * 0.1
            lora[f"{prefix}.lora_B.weight"] = torch.randn(linear.out_features, R, generator=g) * 0.1
    projector = {
        f"base_model.model.model.mm_projector.{o}.{p}": torch.randn_like(
            tiny.state_dict()[f"model.multi_modal_projector.linear_{1 if o == 0 else 2}.{p}"]
        )
        * 0.05
        for o in (0, 2)
        for p in ("weight", "bias")
    }
    return lora, projector


def write_original_lora(folder: Path, lora: dict, projector: dict, fmt: str = "bin") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "liuhaotian/llava-v1.5-7b",
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": R,
                "lora_alpha": ALPHA,
                "lora_dropout": 0.05,
                "bias": "none",
                "target_modules": ["down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj", "v_proj"],
                "inference_mode": True,
            }
        )
    )
    if fmt == "bin":
        torch.save(lora, folder / "adapter_model.bin")
    else:
        save_file(lora, str(folder / "adapter_model.safetensors"))
    torch.save(projector, folder / "non_lora_trainables.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu"}))
    return folder


def hand_applied(tiny_model_dir: Path, lora: dict, projector: dict) -> LlavaForConditionalGeneration:
    """The base with W + B @ A * alpha / r on every layer and the run's projector, done by hand."""
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    state = model.state_dict()
    with torch.no_grad():
        for key, a in lora.items():
            if ".lora_A." in key:
                b = lora[key.replace(".lora_A.", ".lora_B.")]
                name = key.removeprefix("base_model.model.model.").removesuffix(".lora_A.weight")
                state[f"model.language_model.{name}.weight"] += b @ a * (ALPHA / R)
        for key, value in projector.items():
            layer, part = key.split(".")[-2:]
            state[f"model.multi_modal_projector.linear_{1 if layer == '0' else 2}.{part}"].copy_(value)
    return model


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_converted_lora_gives_the_logits_of_the_lora_applied_by_hand(tmp_path, tiny, tiny_model_dir, fmt):
    lora, projector = original_lora(tiny)
    run = write_original_lora(tmp_path / "llava-v1.5-tiny-task-lora", lora, projector, fmt)
    out = convert(ConvertConfig(llava_lora=str(run), base=str(tiny_model_dir), out=str(tmp_path / "adapter")))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    assert config["modules_to_save"] == ["multi_modal_projector"] and config["r"] == R
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    tuned = attach_adapter(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), out)
    assert isinstance(tuned, PeftModel)
    ours = logits_of(tuned, processor)
    torch.testing.assert_close(ours, logits_of(hand_applied(tiny_model_dir, lora, projector), processor))
    assert (ours - logits_of(tiny, processor)).abs().max() > 1e-2  # the adapter does change the answer


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing layer", r"missing \(1\):\n\s+base_model\.model\.model\.layers\.1\.mlp\.down_proj\.lora_B\.weight"),
        ("unknown key", r"not recognised \(1\):\n\s+base_model\.model\.lm_head\.lora_A\.weight \(in .*adapter_model"),
        (
            "wrong rank",
            r"wrong shape \(1\):\n\s+.*layers\.0\.self_attn\.q_proj\.lora_A\.weight.*shape \[3, 96\], expected \[4, 96\]",
        ),
        (
            "projector part",
            r"non_lora_trainables\.bin.*\n\s+missing \(1\):\n\s+base_model\.model\.model\.mm_projector\.2\.bias",
        ),
        (
            "other trainable",
            r"not recognised \(1\):\n\s+base_model\.model\.model\.embed_tokens\.weight \(in .*non_lora",
        ),
        ("no projector file", r"non_lora_trainables\.bin: missing"),
    ],
)
def test_mismatched_lora_runs_name_the_file_and_tensors(tmp_path, tiny, tiny_model_dir, case, pattern):
    lora, projector = original_lora(tiny)
    if case == "missing layer":
        lora = _without(lora, "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    elif case == "unknown key":
        lora["base_model.model.lm_head.lora_A.weight"] = torch.zeros(R, 96)
    elif case == "wrong rank":
        lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 96)
    elif case == "projector part":
        projector = _without(projector, "base_model.model.model.mm_projector.2.bias")
    elif case == "other trainable":
        projector["base_model.model.model.embed_tokens.weight"] = torch.zeros(ORIGINAL_VOCAB, 96)
    run = write_original_lora(tmp_path / "run", lora, projector)
    if case == "no projector file":
        (run / "non_lora_trainables.bin").unlink()
    with pytest.raises(ModelFolderError, match=pattern):
        convert(ConvertConfig(llava_lora=str(run), base=str(tiny_model_dir), out=str(tmp_path / "adapter")))
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------ command line


def test_cli_converts_a_model_and_reports_errors(tmp_path: Path, originals):
    llava, clip = originals
    runner = CliRunner()
    out = tmp_path / "hf"
    result = runner.invoke(app, ["convert", "--llava", str(llava), "--vision-tower", str(clip), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "converted" in result.output and (out / "model.safetensors").exists()
    result = runner.invoke(app, ["convert", "--llava", str(llava), "--vision-tower", str(clip), "--out", str(out)])
    assert result.exit_code == 1 and "already exists" in " ".join(result.output.split())


def test_cli_converts_a_lora_run(tmp_path: Path, tiny, tiny_model_dir: Path):
    run = write_original_lora(tmp_path / "run", *original_lora(tiny))
    out = tmp_path / "adapter"
    args = ["convert", "--llava-lora", str(run), "--base", str(tiny_model_dir), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()

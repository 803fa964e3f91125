import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from helpers import llava_prompt as render_prompt
from vlm_inspect.errors import ModelFolderError
from vlm_inspect.models.families.common import build_tokenizer
from vlm_inspect.models.families.llava import build_tiny_model, save_tiny_model
from vlm_inspect.models.load import load_model, load_processor


def test_tiny_model_round_trips_through_plain_transformers(tiny_model_dir: Path):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this box OK?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nIs this box OK? ASSISTANT:" == render_prompt("Is this box OK?")
    inputs = processor(images=Image.new("RGB", (90, 70), (240, 240, 240)), text=prompt, return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_index).sum())
    assert n_image == model.config.image_seq_length == 64
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_tiny_model_structure_matches_llava_15(tiny_model_dir: Path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["projector_hidden_act"] == "gelu" and config["text_config"]["vocab_size"] % 64 == 0
    assert sum(f.stat().st_size for f in tiny_model_dir.iterdir()) < 5_000_000
    tok = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    assert tok.decode(tok("盒子左上角有黑点")["input_ids"], skip_special_tokens=True) == "盒子左上角有黑点"


def test_tiny_model_is_deterministic_for_a_seed(tmp_path: Path):
    a, b, c = (save_tiny_model(tmp_path / n, seed=s) for n, s in [("a", 1), ("b", 1), ("c", 2)])
    wa, wb, wc = ((p / "model.safetensors").read_bytes() for p in (a, b, c))
    assert wa == wb and wa != wc
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tiny_model_output_std_redraws_only_the_lm_head():
    """The demo's base starts its output rows at 1/sqrt(width) so untrained OK/NG rows are not near-equal."""
    tok = build_tokenizer()
    plain, wide = build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=0, output_std=0.1)
    assert abs(float(plain.lm_head.weight.std()) - 0.02) < 0.003
    assert abs(float(wide.lm_head.weight.std()) - 0.1) < 0.01
    rest = [n for n, _ in plain.named_parameters() if not n.startswith("lm_head")]
    assert all(torch.equal(plain.get_parameter(n), wide.get_parameter(n)) for n in rest)


def test_loader_loads_tiny_in_requested_dtype(tiny_model_dir: Path):
    model = load_model(tiny_model_dir, dtype="bf16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert load_processor(tiny_model_dir).tokenizer.padding_side == "left"


def test_loader_errors_name_the_problem(tmp_path: Path, tiny_model_dir: Path):
    with pytest.raises(ModelFolderError, match="no such model folder"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="missing config.json"):
        load_model(tmp_path / "empty")
    orig = tmp_path / "llava-v1.5-7b"
    orig.mkdir()
    (orig / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_vision_tower": "clip"}))
    with pytest.raises(ModelFolderError, match=r"(?s)original LLaVA layout.*vlm-inspect convert"):
        load_model(orig)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelFolderError, match=r"missing weights.*tokenizer.*image processor"):
        load_model(partial)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="adapter"):
        load_model(adapter)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_a_processor_that_drops_a_side_input_is_refused(name: str, tmp_path: Path):
    """Without Qwen2.5-VL's mm_token_type_ids or Gemma 3's token_type_ids the logits change silently: refuse."""
    from vlm_inspect.config import ModelSettings
    from vlm_inspect.inference import Predictor
    from vlm_inspect.models.families import family_named

    family = family_named(name)
    predictor = Predictor.load(ModelSettings(model=family.build_tiny(tmp_path / name), device="cpu"))
    photo = Image.new("RGB", (64, 48), "white")
    assert len(predictor.score([photo], "Is it OK?")) == 1
    real = predictor.processor.__call__

    def dropping(*args, **kwargs):
        out = real(*args, **kwargs)
        del out[family.side_inputs[0]]
        return out

    predictor.processor.__class__ = type("Dropping", (type(predictor.processor),), {"__call__": staticmethod(dropping)})
    with pytest.raises(ModelFolderError, match=family.side_inputs[0]):
        predictor.score([photo], "Is it OK?")

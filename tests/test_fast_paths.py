"""The fast paths behind `train` and `predict` compute what the plain transformers paths compute."""

from __future__ import annotations

import functools
import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments

from helpers import llava_prompt as render_prompt
from vlm_inspect.config import ModelSettings, TrainConfig
from vlm_inspect.data.dataset import Collator, load_training_dataset
from vlm_inspect.inference import Predictor
from vlm_inspect.models.families import family_named, family_of_model
from vlm_inspect.models.load import load_processor
from vlm_inspect.training import loop, memory
from vlm_inspect.training import model as training_model
from vlm_inspect.training.loop import InspectTrainer
from vlm_inspect.training.memory import (
    Checkpointing,
    apply_checkpointing,
    choose_batch_size,
    estimate_memory_gib,
    optimizer_name,
)
from vlm_inspect.training.model import apply_lora


@pytest.fixture(scope="module")
def batch(tiny_model_dir: Path, spot_dataset: Path) -> dict[str, torch.Tensor]:
    """Four samples of different lengths (one and two answers), right-padded by the training collator."""
    processor = load_processor(tiny_model_dir)
    dataset = load_training_dataset(spot_dataset, processor, family_named("llava"), max_length=512)
    return Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])


def lora_model(tiny_model_dir: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).requires_grad_(False)
    cfg = TrainConfig(model=str(tiny_model_dir), data="-", out="-", lora_r=8, lora_alpha=16)
    model = apply_lora(model, cfg, family_of_model(model))
    with torch.no_grad():  # B starts at zero; give the adapter something to say
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.train()


def trainer_for(model: torch.nn.Module, tmp_path: Path) -> InspectTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    return InspectTrainer(model=model, args=args, projector_lr=1e-4, scheduler_kind="constant", warmup_steps=0)


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_supervised_token_loss_equals_the_stock_loss_and_gradients(tiny_model_dir: Path, batch, tmp_path: Path):
    model = lora_model(tiny_model_dir)
    stock = model(**batch).loss  # transformers' causal-LM loss over full logits
    stock.backward()
    stock_grads = lora_grads(model)
    model.zero_grad()

    trainer = trainer_for(model, tmp_path)
    count = (batch["labels"][:, 1:] != -100).sum()
    ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
    ours.backward()
    ours_grads = lora_grads(model)

    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)
    assert stock_grads.keys() == ours_grads.keys() and any("multi_modal_projector" in n for n in ours_grads)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_head_sees_only_supervised_positions(tiny_model_dir: Path, batch, tmp_path: Path):
    model = lora_model(tiny_model_dir)
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _args, out: seen.append(out.shape))
    trainer_for(model, tmp_path).compute_loss(model, dict(batch), num_items_in_batch=None)
    handle.remove()
    supervised = int((batch["labels"] != -100).sum())  # each supervised label is one head row
    assert seen == [torch.Size([supervised, head.out_features])]
    assert supervised < batch["labels"].numel() / 4  # the image and question tokens are most of the batch
    assert not head._forward_pre_hooks  # the trimming hook is gone after the step


def test_partial_checkpointing_gives_the_same_gradients(tiny_model_dir: Path, batch, tmp_path: Path):
    results = []
    for recomputed in (0, 1):
        model = lora_model(tiny_model_dir)
        apply_checkpointing(model, Checkpointing(recomputed, 2))
        flags = [layer.gradient_checkpointing for layer in memory.language_layers(model)]
        assert flags == [True, False][:recomputed] + [False] * (2 - recomputed)
        count = (batch["labels"][:, 1:] != -100).sum()
        trainer_for(model, tmp_path).compute_loss(model, dict(batch), num_items_in_batch=count).backward()
        results.append(lora_grads(model))
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_leaves_the_frozen_vision_tower_out_of_the_backward(tiny_model_dir: Path, batch):
    def vision_outputs_require_grad(model: torch.nn.Module) -> tuple[list[bool], Any]:
        vision = model.get_base_model().model.vision_tower
        layers = [m for m in vision.modules() if hasattr(m, "gradient_checkpointing")]
        seen: list[bool] = []
        for layer in layers:
            layer.register_forward_hook(lambda _m, _a, out: seen.append(out[0].requires_grad))
        return seen, layers

    stock = lora_model(tiny_model_dir)
    seen, _ = vision_outputs_require_grad(stock)
    stock.get_base_model().gradient_checkpointing_enable()  # what transformers does on its own
    stock(**batch)
    assert seen and all(seen)  # the tower would be recomputed and back-propagated through

    model = lora_model(tiny_model_dir)
    seen, vision_layers = vision_outputs_require_grad(model)
    apply_checkpointing(model, Checkpointing(2, 2))
    loss = model(**batch).loss
    assert seen and not any(seen)
    assert not any(m.gradient_checkpointing for m in vision_layers)
    assert all(layer.gradient_checkpointing for layer in memory.language_layers(model))
    loss.backward()  # LoRA and projector still get gradients
    grads = lora_grads(model)
    assert any("lora_A" in n for n in grads) and any("multi_modal_projector" in n for n in grads)


def test_flop_estimate_is_the_stock_one_with_the_weights_counted_once(tiny_model_dir: Path, batch, tmp_path: Path):
    model = lora_model(tiny_model_dir)
    trainer = trainer_for(model, tmp_path)
    stock = Trainer.floating_point_ops(trainer, batch)
    calls = []
    count = model.num_parameters
    model.num_parameters = lambda **kw: calls.append(kw) or count(**kw)
    assert [trainer.floating_point_ops(batch) for _ in range(3)] == [stock] * 3 and stock > 0
    assert len(calls) == 1


def test_objects_alive_at_the_start_and_after_step_one_skip_the_collector_until_training_ends():
    from transformers import TrainerState

    callback, state = loop.FreezeLongLivedObjects(), TrainerState()
    callback.on_train_begin(None, state, None)
    at_start = gc.get_freeze_count()
    model_made_in_step_one = [torch.nn.Linear(2, 2) for _ in range(50)]
    state.global_step = 1
    callback.on_step_end(None, state, None)
    assert 0 < at_start < gc.get_freeze_count()
    callback.on_train_end(None, state, None)
    assert gc.get_freeze_count() == 0 and model_made_in_step_one


def test_qlora_skip_list_keeps_vision_and_projector_in_16_bits(tiny_model_dir: Path):
    """transformers matches skip patterns from the start of the module name: short names are not enough."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = {n for n in linears if should_convert_module(n, family_named("llava").qlora_keep_unquantized())}
    assert converted and all(".language_model.layers." in n for n in converted)
    assert all(n in converted for n in linears if ".language_model.layers." in n)
    short_names = ["vision_tower", "multi_modal_projector", "lm_head"]  # what the seed (and issue 10) used
    assert any("multi_modal_projector" in n for n in linears if should_convert_module(n, short_names))


def test_qlora_trainable_weights_are_kept_in_the_compute_dtype(tiny_model_dir: Path):
    model = lora_model(tiny_model_dir)
    training_model.keep_adapter_in(model, torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if not p.requires_grad)


@functools.cache
def meta_7b() -> torch.nn.Module:
    """LLaVA-1.5-7B's shape on the meta device (no memory) with the recipe's LoRA."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32064
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(
            LlavaConfig(vision_config=vision, text_config=text), dtype=torch.bfloat16
        )
    return apply_lora(model.requires_grad_(False), TrainConfig(model="-", data="-", out="-"), family_named("llava"))


class SevenBData:
    lengths = [640] * 64

    def __len__(self) -> int:
        return 64


@pytest.mark.parametrize(("card_gib", "batch", "all_layers"), [(23.6, 8, True), (80.0, 8, False)])
@pytest.mark.integration  # seconds: CI runs it, the unit loop leaves it out
def test_memory_plan_for_the_7b_shape(monkeypatch, card_gib: float, batch: int, all_layers: bool):
    """A 24 GB card trains LoRA at batch 8 with no flags by recomputing (nearly) every layer; an 80 GB card
    keeps every layer's activations. Estimates are calibrated against benchmarks/gpu.py on an H100."""
    model = meta_7b()
    monkeypatch.setattr(memory, "gpu_memory_gib", lambda device: card_gib - 0.5)
    cfg = TrainConfig(model="-", data="-", out="-")
    chosen, checkpointing = choose_batch_size(cfg, model, SevenBData(), torch.device("cuda"))
    assert chosen == batch and checkpointing.total == 32
    assert checkpointing.estimate_gib <= checkpointing.budget_gib <= card_gib
    if all_layers:
        assert checkpointing.layers >= 24
        fewer = estimate_memory_gib(model, 8, 640, checkpointing.layers - 1)
        assert fewer > checkpointing.budget_gib  # the plan recomputes as few layers as fit, no fewer
    else:
        assert checkpointing.layers == 0


def test_qlora_plans_with_8_bit_adam_moments():
    """QLoRA trains with bitsandbytes' 8-bit AdamW, and the plan counts its moments at one byte each."""
    model = meta_7b()
    assert optimizer_name(TrainConfig(model="-", data="-", out="-", method="qlora")) == "adamw_bnb_8bit"
    assert optimizer_name(TrainConfig(model="-", data="-", out="-")) == "adamw_torch_fused"
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = sum(p.numel() * (2 * p.element_size() - 2) for p in trainable) / 2**30
    full, eight_bit = (estimate_memory_gib(model, 1, 640, 32, eight_bit_moments=e) for e in (False, True))
    assert saved > 1.0  # fp32 LoRA r 128 on the 7B: 6 bytes per weight saved
    assert full - eight_bit == pytest.approx(saved, rel=1e-6)


def photos() -> list[Image.Image]:
    images = []
    for i in range(3):
        image = Image.new("RGB", (80 + 10 * i, 64), (220, 220 - 30 * i, 210))
        ImageDraw.Draw(image).ellipse((10, 10, 30, 30), fill=(40 * i, 0, 0))
        images.append(image)
    return images


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_greedy_decoder_gives_the_tokens_of_generate(tiny_model_dir: Path, device: str):
    """Prompts of different lengths (left padding) give the same answers as transformers' generate;
    on CUDA through the compiled prefill, the compiled step with stacked projections, and its CUDA graph."""
    predictor = Predictor.load(ModelSettings(model=tiny_model_dir, device=device, precision="fp32"))
    prompts = [render_prompt(q) for q in ("Is this box OK or NG?", "Describe.", "Any defects on the box, top or left?")]
    ours = predictor.generate(photos(), prompts, max_new_tokens=12)
    inputs = predictor._inputs(photos(), prompts)
    with torch.inference_mode():
        ids = predictor.model.generate(**inputs, **predictor._sampling(12, 0.0))
    new = ids[:, inputs["input_ids"].shape[1] :]
    assert ours == [t.strip() for t in predictor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    assert len(set(ours)) > 1
    assert predictor.generate(photos(), prompts, max_new_tokens=12) == ours  # the kept decoder is reused
    assert len(predictor._decoders) == 1


@pytest.mark.parametrize("prefill", [False, True])
def test_compiled_modules_give_the_same_logits_and_are_swapped_back(tiny_model_dir: Path, monkeypatch, prefill: bool):
    """The GPU paths' compiled modules (traced by dynamo; the eager backend keeps the test fast on CPU):
    vision layers, and language-model layers for scoring or the whole language model for describe's prefill."""
    from vlm_inspect.models import fast_paths as predict_module

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real_compile(module, backend="eager", **kw))
    predictor = Predictor.load(ModelSettings(model=tiny_model_dir, device="cpu", precision="fp32"))
    inputs = predictor._inputs(photos(), [render_prompt("Is this box OK or NG?")] * 3)
    slots = predict_module.compile_slots(predictor.model, prefill=prefill)
    text = predictor.model.config.text_config
    vision = predictor.model.config.vision_config
    language = 1 if prefill else text.num_hidden_layers  # the whole language model, or each layer
    assert len(slots) == vision.num_hidden_layers + language
    originals = [getattr(parent, name) for parent, name in slots]
    with torch.inference_mode():
        plain = predictor.model(**inputs, logits_to_keep=1).logits[:, -1]
        compiled: dict[int, torch.nn.Module] = {}
        with predict_module.compiled_modules(slots, compiled):
            swapped = [getattr(parent, name) for parent, name in slots]
            fast = predictor.model(**inputs, logits_to_keep=1).logits[:, -1]
        with predict_module.compiled_modules(slots, compiled):
            again = [getattr(parent, name) for parent, name in slots]
    assert all(new is not old for new, old in zip(swapped, originals, strict=True))
    assert swapped == again  # the wrappers are made once and reused
    assert [getattr(parent, name) for parent, name in slots] == originals
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_stacked_projections_give_the_same_outputs_in_one_matmul_when_compiled(tiny_model_dir: Path):
    """describe's decode step reads q/k/v (and gate/up) through one stacked weight: same numbers, weights
    shared with the originals, and once compiled one matmul where there were three (two)."""
    from torch._dynamo.backends.common import aot_autograd

    from vlm_inspect.models import fast_paths as predict_module

    predictor = Predictor.load(ModelSettings(model=tiny_model_dir, device="cpu", precision="fp32"))
    layer = predictor.model.model.language_model.layers[0]
    x = torch.randn(2, 1, predictor.model.config.text_config.hidden_size)
    scores = predictor.score(photos())
    attn, mlp = layer.self_attn, layer.mlp

    def projections() -> tuple[torch.Tensor, ...]:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp.gate_proj(x), mlp.up_proj(x)

    def matmuls_when_compiled() -> int:
        counted = []

        def count(graph: torch.fx.GraphModule, _inputs: list) -> Any:
            matmuls = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
            counted.append(sum(node.target in matmuls for node in graph.graph.nodes))
            return graph

        torch._dynamo.reset()
        torch.compile(projections, backend=aot_autograd(fw_compiler=count))()
        return counted[0]

    with torch.inference_mode():
        plain = projections()
        plain_matmuls = matmuls_when_compiled()
        cache: dict[int, Any] = {}
        swaps = predict_module.stacked_projections(predictor.model, cache)
        assert len(swaps) == 5 * predictor.model.config.text_config.num_hidden_layers
        with predict_module.swapped_modules(swaps):
            stacked = projections()
            stacked_matmuls = matmuls_when_compiled()
        assert predict_module.stacked_projections(predictor.model, cache) == swaps  # stacked once per model
    assert (plain_matmuls, stacked_matmuls) == (5, 2)
    assert type(attn.q_proj) is torch.nn.Linear  # swapped back
    assert attn.q_proj.weight.data_ptr() == swaps[0][2].stacked.data_ptr()  # a view: no second copy
    for a, b in zip(plain, stacked, strict=True):
        torch.testing.assert_close(a, b)
    assert predictor.score(photos()) == pytest.approx(scores, abs=1e-6)  # the model reads the views


@pytest.mark.gpu
def test_warm_up_leaves_nothing_to_compile_for_the_first_requests(tiny_model_dir: Path):
    """After `warm_up`, scores at other batch sizes and a describe add no compiled wrapper or decoder."""
    torch._dynamo.reset()  # as in a fresh server process: no shapes seen by the tests before
    predictor = Predictor.load(ModelSettings(model=tiny_model_dir, device="cuda", precision="fp32"))
    predictor.warm_up(max_batch=4, max_new_tokens=8)
    compiled, decoders = dict(predictor._compiled), list(predictor._decoders)
    assert compiled and decoders
    recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    predictor.score(photos()[:3], batch_size=3)
    predictor.describe(photos()[:1], max_new_tokens=8)
    assert predictor._compiled == compiled and list(predictor._decoders) == decoders
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == recompiles

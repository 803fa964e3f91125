"""FP8 base weights (`precision=fp8`): refusal where FP8 can't run, the arithmetic of the FP8 layer, and its
composition with PEFT LoRA and the memory plan. On the CPU the FP8 GEMM is emulated (the product of the
dequantized operands); `@pytest.mark.gpu` tests run the real `torch._scaled_mm`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vlm_inspect.config import ModelSettings, TrainConfig
from vlm_inspect.errors import ConfigError
from vlm_inspect.inference import Predictor
from vlm_inspect.models import fp8
from vlm_inspect.models.families import family_of_model
from vlm_inspect.models.fp8 import Fp8Linear, dequantize, quantize_rows, to_fp8
from vlm_inspect.train import validate
from vlm_inspect.training import memory
from vlm_inspect.training import model as training_model

E4M3_RELATIVE_STEP = 2.0**-3  # 3 mantissa bits: neighbours differ by at most 1/8 of the smaller


def weight_like(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed rows of different sizes, a few outlier input columns: what trained linears look like."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(5.0).sample((rows, cols)) * 0.02
    w *= torch.exp(torch.randn(rows, 1, generator=gen) * 0.5)
    w[:, torch.randperm(cols, generator=gen)[:4]] *= 8
    return w


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.fixture
def fp8_allowed(monkeypatch):
    """Let the CPU pass the capability check, to test the arithmetic and the wiring."""
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, "test"))


def test_fp8_is_refused_on_the_cpu_with_a_clear_message(tiny_model_dir: Path):
    ok, reason = fp8.fp8_supported("cpu")
    assert not ok and "CUDA GPU" in reason and "CPU" in reason
    with pytest.raises(ConfigError, match=r"precision: fp8 needs a CUDA GPU .* use precision=bf16"):
        Predictor.load(
            ModelSettings(model=tiny_model_dir, device="cpu", precision="fp8")
        )  # refused before the weights load
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).requires_grad_(False)
    with pytest.raises(ConfigError, match="fp8 needs a CUDA GPU"):
        to_fp8(model)
    with pytest.raises(ConfigError, match="needs method=lora, not qlora"):
        validate(TrainConfig(model="m", data="d", out="o", method="qlora", precision="fp8"))


def test_row_wise_quantization_stays_within_one_e4m3_step():
    w = weight_like(64, 256)
    w[3] = 0.0  # an all-zero row (padding) must not give NaN
    q, scale = quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = dequantize(q, scale)
    assert torch.isfinite(back).all() and (back[3] == 0).all()
    # Normal numbers round within half a step; the smallest (subnormal) within half of 2^-9 of the scale.
    bound = w.abs() * E4M3_RELATIVE_STEP / 2 + scale * 2.0**-10
    assert ((back - w).abs() <= bound * 1.0001).all()
    assert (back.abs().amax(-1) - w.abs().amax(-1)).abs().max() <= 1e-6  # each row's largest survives


def test_fp8_layer_forward_and_input_gradient_match_the_reference_and_leave_the_weight_alone():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False)
    linear.weight.data = weight_like(128, 256)
    layer = Fp8Linear(linear)
    x = torch.randn(2, 5, 256, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)

    # Reference: the dequantized operands, multiplied in float64; then the exact product.
    xq, xs = quantize_rows(x.detach().reshape(-1, 256))
    ref = dequantize(xq, xs).double() @ dequantize(layer.weight, layer.weight_scale).double().T
    assert relative_error(out.detach().reshape(-1, 128), ref) < 1e-6
    assert relative_error(out.detach(), x.detach() @ linear.weight.T) < 0.06
    gq, gs = quantize_rows(grad.reshape(-1, 128), layer.weight_scale.T)
    ref_dx = dequantize(gq, gs).double() @ layer.weight.double()
    assert relative_error(x.grad.reshape(-1, 256), ref_dx) < 1e-6
    assert relative_error(x.grad, grad @ linear.weight) < 0.06
    assert layer.weight.grad is None and layer.weight_scale.grad is None
    assert not layer.weight.requires_grad


def lora_tiny(tiny_model_dir: Path, fp8_first: bool) -> torch.nn.Module:
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).requires_grad_(False)
    cfg = TrainConfig(model=str(tiny_model_dir), data="-", out="-", lora_r=8, lora_alpha=16)
    converted = to_fp8(model) if fp8_first else 0
    model = training_model.apply_lora(model, cfg, family_of_model(model))
    converted += 0 if fp8_first else to_fp8(model)
    layers = len(model.get_base_model().model.language_model.layers)
    assert converted == 7 * layers
    return model


@pytest.mark.parametrize("fp8_first", [False, True], ids=["lora-then-fp8", "fp8-then-lora"])
def test_lora_attaches_to_fp8_layers_and_only_lora_and_projector_train(
    tiny_model_dir: Path, fp8_allowed, fp8_first: bool
):
    model = lora_tiny(tiny_model_dir, fp8_first)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    language = [m for m in lora_layers if isinstance(m.base_layer, Fp8Linear)]
    assert len(language) == 7 * 2  # every decoder projection of the 2 layers, still under LoRA
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in language)  # not cast to FP8
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    ids = torch.tensor([[1, 5, 9, 4, 7, 3]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(m.lora_A["default"].weight.grad is not None for m in language)
    assert all(m.base_layer.weight.grad is None for m in language)


@pytest.mark.integration  # seconds: CI runs it, the unit loop leaves it out
def test_the_memory_plan_counts_fp8_weights_at_one_byte_and_recomputes_fewer_layers(fp8_allowed, monkeypatch):
    from test_fast_paths import SevenBData, meta_7b

    monkeypatch.setattr(memory, "gpu_memory_gib", lambda device: 23.6 - 0.5)
    cfg = TrainConfig(model="-", data="-", out="-")
    model = meta_7b.__wrapped__()  # a fresh one: to_fp8 changes it
    before = memory.estimate_memory_gib(model, 8, 640, 32)
    _, bf16_plan = memory.choose_batch_size(cfg, model, SevenBData(), torch.device("cuda"))
    assert to_fp8(model) == 7 * 32
    after = memory.estimate_memory_gib(model, 8, 640, 32)
    assert before - after == pytest.approx(6.2, abs=0.2)  # 6.5 B language-model weights, 1 byte instead of 2
    chosen, fp8_plan = memory.choose_batch_size(cfg, model, SevenBData(), torch.device("cuda"))
    assert chosen == 8 and fp8_plan.layers <= bf16_plan.layers - 8


def test_predictor_in_fp8_scores_like_bf16(tiny_model_dir: Path, fp8_allowed):
    from PIL import Image

    images = [Image.new("RGB", (48, 40), color) for color in ("white", "gray", "black")]
    bf16 = Predictor.load(ModelSettings(model=tiny_model_dir, device="cpu", precision="bf16")).score(
        images, batch_size=3
    )
    quantized = Predictor.load(ModelSettings(model=tiny_model_dir, device="cpu", precision="fp8"))
    assert sum(isinstance(m, Fp8Linear) for m in quantized.model.modules()) == 14
    assert max(abs(a - b) for a, b in zip(quantized.score(images, batch_size=3), bf16, strict=True)) < 0.05


@pytest.mark.gpu
def test_scaled_mm_layer_matches_the_emulated_product_on_a_gpu():
    if not fp8.fp8_supported("cuda")[0]:
        pytest.skip(fp8.fp8_supported("cuda")[1] if torch.cuda.is_available() else "no CUDA GPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 11008, bias=False, device="cuda", dtype=torch.bfloat16)
    linear.weight.data = weight_like(11008, 4096).to("cuda", torch.bfloat16)
    layer = Fp8Linear(linear)
    x = torch.randn(3, 640, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    emulated = Fp8Linear(linear.cpu().float())
    x_cpu = x.detach().float().cpu().requires_grad_(True)
    emulated(x_cpu).backward(grad.float().cpu())
    assert relative_error(out.float().cpu(), emulated(x_cpu).detach()) < 1e-2
    assert relative_error(x.grad.float().cpu(), x_cpu.grad) < 1e-2
    assert layer.weight.grad is None

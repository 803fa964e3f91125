"""FP8 base weights for the frozen language model under LoRA (`precision=fp8`).

Each language-model decoder linear (`model.language_model.layers.*.{self_attn,mlp}.*_proj`, the same path
in LLaVA, Qwen2.5-VL, Qwen3-VL, InternVL and Gemma 3) becomes an `Fp8Linear`: its weight is stored in
float8 e4m3 with one fp32 scale per output row, its forward quantizes the activation per token (one fused
kernel, compiled) and runs `torch._scaled_mm`, and its backward computes only the input gradient, also as
an FP8 GEMM. The weight gradient is never computed: the base is frozen. LoRA weights, the projector,
norms, embeddings, the LM head and the vision tower stay as they are.

Why row-wise scales: on weights shaped like trained ones (heavy tails, rows of different sizes, outlier
input columns; `benchmarks/fp8.py`, `accuracy`) one scale per row, per tensor and per 128 × 128 block
give the same error (2.6 % of the weight, 3.5-3.7 % of x @ W.T with x per token): e4m3 is a float
format, so the 3-bit mantissa sets the error and the scale only has to keep values in range. Row-wise
scales are the ones `_scaled_mm` applies in its epilogue (measured on sm_90; sm_89 not tried), and a row's scale
folds into the gradient before the backward GEMM (`grad @ W = (grad · s) @ q`), so the backward needs no
second copy of the weight with other scales.

FP8 tensor cores need compute capability 8.9 or newer (RTX 40xx, L4, H100, H200); `fp8_supported` says
whether a device has them and `resolve_compute_dtype` refuses the setting where it does not.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm_inspect.errors import ConfigError, VlmInspectError
from vlm_inspect.models.families import family_of_model

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# The decoder linears that become FP8: attention and MLP projections of each language-model layer.
BLOCKS = ("self_attn", "mlp")
# torch._scaled_mm needs both dimensions of the weight to be multiples of 16.
ALIGN = 16


def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` runs FP8 GEMMs, and why (or why not) in words."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"needs a CUDA GPU with FP8 tensor cores; this run is on the {device.type.upper()}"
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU with FP8 tensor cores; torch sees no CUDA GPU"
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, (
            f"needs FP8 tensor cores (compute capability 8.9 or newer: RTX 40xx, L4, H100, H200); "
            f"{name} is {major}.{minor}"
        )
    if not hasattr(torch, "_scaled_mm"):
        return False, f"needs torch._scaled_mm, which torch {torch.__version__} lacks"
    return True, f"{name} (compute capability {major}.{minor}) has FP8 tensor cores"


def resolve_compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype of everything that is not an FP8 weight (bf16); raises ConfigError where FP8 can't run."""
    ok, reason = fp8_supported(device)
    if not ok:
        raise ConfigError([f"precision: fp8 {reason}; use precision=bf16 (or auto)"])
    return torch.bfloat16


def quantize_rows(x: torch.Tensor, fold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with x · fold ≈ q · scale: each row of the last two dims in e4m3, its largest magnitude at 448.

    `fold` (broadcast over rows) multiplies x first; an all-zero row gets a tiny scale, not a NaN.
    """
    x = x.float() if fold is None else x.float() * fold
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 values an FP8 tensor and its scales stand for."""
    return q.float() * scale


_compiled_quantize: dict[str, Any] = {}


def fused_quantize(x: torch.Tensor, fold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` as one compiled kernel on a GPU (amax, scale and cast in one pass over x).

    Quantizing in separate eager kernels (read x for the amax, again to scale, again to cast) gave most of
    the FP8 GEMM's 1.8× back. Inside a compiled decoder layer this is inlined and fuses into the kernel
    that produces x (the norm, the SiLU product).
    """
    if not x.is_cuda:
        return quantize_rows(x, fold)
    if "fn" not in _compiled_quantize:
        _compiled_quantize["fn"] = torch.compile(quantize_rows, dynamic=True)
    return _compiled_quantize["fn"](x, fold)


def scaled_matmul(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """(a · a_scale) @ (b · b_scale): a (M, K) row-major with (M, 1) scales, b (K, N) column-major with (1, N).

    On a GPU one `torch._scaled_mm`, which applies the scales in its epilogue. Elsewhere (only where tests
    check the arithmetic: `to_fp8` refuses the CPU) the same product of the dequantized operands.
    """
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)
    return (dequantize(a, a_scale) @ dequantize(b, b_scale)).to(out_dtype)


class Fp8Matmul(torch.autograd.Function):
    """x @ (q · scale).T with the input gradient as an FP8 GEMM and no weight gradient.

    Forward: x quantized per token, times the weight (stored (N, K) row-major, which `.t()` makes the
    column-major (K, N) `_scaled_mm` wants); nothing of x is saved. Backward: grad @ W, with W's row
    scales folded into grad before grad is quantized per token, and the weight transposed (a copy, 1 byte
    per weight, freed at once) so that it is column-major for the second operand.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> Any:
        rows = x.reshape(-1, x.shape[-1])
        q, q_scale = fused_quantize(rows)
        out = scaled_matmul(q, q_scale, weight.t(), scale.t(), out_dtype)
        ctx.save_for_backward(weight, scale)
        ctx.dtypes = x.dtype, out_dtype
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        weight, scale = ctx.saved_tensors
        input_dtype, out_dtype = ctx.dtypes
        rows = grad.reshape(-1, grad.shape[-1])
        g, g_scale = fused_quantize(rows, scale.t())
        column_major = weight.t().contiguous().t()
        ones = torch.ones(1, weight.shape[1], dtype=torch.float32, device=weight.device)
        dx = scaled_matmul(g, g_scale, column_major, ones, out_dtype).to(input_dtype)
        return dx.reshape(*grad.shape[:-1], weight.shape[1]), None, None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen linear layer whose weight is float8 e4m3 with one fp32 scale per output row.

    A subclass of `nn.Linear`, so PEFT's LoRA wraps it like any linear (before or after the swap);
    `compute_dtype` tells PEFT the dtype to give the adapter (as for bitsandbytes layers). The weight and
    its scales are parameters (frozen), so the memory plan counts them at their real size.
    """

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        q, scale = quantize_rows(linear.weight.detach())
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.register_parameter("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = Fp8Matmul.apply(x, self.weight, self.weight_scale, self.compute_dtype)
        return out if self.bias is None else out + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight as the layer applies it, in its compute dtype."""
        return dequantize(self.weight, self.weight_scale).to(self.compute_dtype)


def decoder_linears(model: Any) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of each language-model decoder projection's plain linear, under LoRA too."""
    slots = []
    for layer in family_of_model(model).language_layers(model):
        for block in (getattr(layer, name, None) for name in BLOCKS):
            for name, child in list(block.named_children()) if block is not None else []:
                if not name.endswith("_proj"):
                    continue
                parent, attr = (child, "base_layer") if hasattr(child, "base_layer") else (block, name)
                if type(getattr(parent, attr)) is torch.nn.Linear:
                    slots.append((parent, attr))
    return slots


def to_fp8(model: Any) -> int:
    """Store the language model's decoder linears in FP8 (in place); returns how many were converted.

    Works on a plain model and on one PEFT has wrapped (the LoRA layers' base layers are swapped). The
    FP8 layers are frozen (`train` refuses fp8 with full fine-tuning). Raises ConfigError on a device
    without FP8, VlmInspectError where no such linear is found.
    """
    slots = decoder_linears(model)
    if not slots:
        raise VlmInspectError(
            f"precision fp8: {type(model).__name__} has no plain linear under "
            "model.language_model.layers.*.{self_attn,mlp}.*_proj (already FP8, or quantized?)"
        )
    device = getattr(slots[0][0], slots[0][1]).weight.device
    resolve_compute_dtype(device)
    if device.type == "cuda":  # made here, not first while torch.compile traces a layer
        _compiled_quantize.setdefault("fn", torch.compile(quantize_rows, dynamic=True))
    converted = 0
    for parent, attr in slots:
        linear = getattr(parent, attr)
        if linear.in_features % ALIGN or linear.out_features % ALIGN:
            continue  # _scaled_mm can't take it: stays in its dtype
        setattr(parent, attr, Fp8Linear(linear))
        converted += 1
    return converted

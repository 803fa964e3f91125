"""The Qwen vision towers' attention as one packed (variable-length) attention call per layer, on CUDA.

Stock transformers runs the Qwen2.5-VL tower's attention, outside flash-attn, as one call per window per
layer (8 × 8-patch windows in 28 of 32 layers, full attention per image in 4), and Qwen3-VL's as one call
per image per layer. Measured on an H200 (`/work/shared/reference/qwen-speed-facts.md`, Qwen2.5-VL-7B tower,
a 1092 × 896 photo): 2,244 attention calls per photo, 122–147 ms per image at batch 8–32 with stock sdpa
against 40 ms with PyTorch's `torch.nn.attention.varlen.varlen_attn`, one call per layer over the same
windows (FlexAttention with a block mask: 42 ms at batch 8, out of memory at 32). Its output agrees with
stock as closely as stock's own eager and sdpa backends agree with each other (relative error 0.021
against 0.026 after 32 random layers). This module's own run (issue 27, `benchmarks/gpu.py --family
qwen2_5_vl`, same GPU kind, batch 32 of 1120 × 896): 78.2 ms per photo stock, 39.1 packed, 17.6 packed with
the blocks compiled; relative error against stock sdpa 0.021 (stock eager: 0.026). Qwen3-VL's tower gains
nothing from it (its per-image calls are 5,120 tokens long already): eager scoring forward of 32 photos
2.18 s packed against 2.04 s stock.

`pack_vision_attention(tower, plan)` switches each tower attention module to `PackedVisionAttention`
(a subclass of the stock class: same weights and state-dict names) and makes the tower read what it
derives from the photo sizes (window index, sequence boundaries, their maximum lengths, rotary positions,
position-embedding interpolation) from a per-size cache, built on the CPU once per photo size instead of
by the GPU-syncing loops of `transformers.vision_utils` on every forward. transformers' towers accept
these precomputed through their keyword arguments (made for compile/export). On a CPU nothing changes:
`varlen_attn` is CUDA only, and the stock path stays.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

try:  # torch >= 2.9; CUDA only
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:
    _varlen_attn = None

# Photo-size plans kept per tower (a server sees a few sizes; each plan is a few small tensors).
PLAN_CACHE_SIZE = 32
_HOOK = "_vlm_inspect_plan_hook"
_PACKED_CLASSES: dict[type, type] = {}


def varlen_available(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether one packed attention call can run here: PyTorch's varlen attention (flash attention: CUDA,
    fp16 or bf16; an fp32 tower stays stock)."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _varlen_attn is not None


@torch.compiler.disable
def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """(tokens, heads, dim) attention within each segment of `cu_seqlens` (no mask, not causal).

    Left out of compiled graphs (a graph break in each compiled vision block: the norms, rotary and MLP
    around it still fuse), so a changing maximum length never recompiles a block."""
    return _varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)


def _packed_forward(
    self: Any,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The stock attention's arithmetic (fused qkv, rotary in fp32, softmax(QKᵀ·scale)V, proj) with every
    window (or image) of the layer in one varlen call."""
    tokens = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).unbind(1)
    cos, sin = position_embeddings
    q, k = self.rotary(q, k, cos, sin)
    if max_seqlen is None:  # not precomputed (a caller outside the plan): one GPU sync per layer
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = varlen_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.to(torch.int32), max_seqlen, self.scaling
    )
    return self.proj(out.reshape(tokens, -1))


def packed_class(stock: type) -> type:
    """`PackedVisionAttention` for a stock attention class (made once per class)."""
    if stock not in _PACKED_CLASSES:
        rotary = sys.modules[stock.__module__].apply_rotary_pos_emb_vision  # the tower's own rotary
        _PACKED_CLASSES[stock] = type(
            "PackedVisionAttention",
            (stock,),
            {"forward": _packed_forward, "rotary": staticmethod(rotary), "__doc__": _packed_forward.__doc__},
        )
    return _PACKED_CLASSES[stock]


# ------------------------------------------------------------------ per-size plans


def _max_length(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def window_plan(tower: Any, grid_thw: torch.Tensor) -> dict[str, Any]:
    """Qwen2.5-VL: what the tower derives from the photo sizes, computed on the CPU by transformers' own
    helpers (so it is the stock plan), with the two maximum segment lengths varlen needs as ints."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    config = tower.config
    window_index, cu_window = get_vision_window_index(
        grid_thw, config.spatial_merge_size, config.window_size, config.patch_size
    )
    cu_seqlens = get_vision_cu_seqlens(grid_thw)
    return {
        "position_ids": get_vision_position_ids(grid_thw, config.spatial_merge_size),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": _max_length(cu_seqlens),
        "window_index": window_index,
        "cu_window_seqlens": cu_window,
        "max_window_seqlen": _max_length(cu_window),
    }


def interpolation_plan(tower: Any, grid_thw: torch.Tensor) -> dict[str, Any]:
    """Qwen3-VL: rotary positions, per-image boundaries and the learned position grid's resampling."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    config = tower.config
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw,
        num_grid_per_side=tower.num_grid_per_side,
        mode=getattr(tower, "interpolation_mode", "bilinear"),
        align_corners=getattr(tower, "interpolation_align_corners", True),
        spatial_merge_size=config.spatial_merge_size,
    )
    cu_seqlens = get_vision_cu_seqlens(grid_thw)
    return {
        "interp_indices": indices,
        "interp_weights": weights,
        "position_ids": get_vision_position_ids(grid_thw, config.spatial_merge_size),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": _max_length(cu_seqlens),
    }


class PlanCache:
    """Plans by photo-size list, on the tower's device; the least recently used goes first."""

    def __init__(self, build: Callable[[Any, torch.Tensor], dict[str, Any]], size: int = PLAN_CACHE_SIZE):
        self.build, self.size = build, size
        self.plans: OrderedDict[tuple, dict[str, Any]] = OrderedDict()

    def get(self, tower: Any, grid_thw: torch.Tensor) -> dict[str, Any]:
        key = (str(grid_thw.device), tuple(grid_thw.flatten().tolist()))  # the one host read per forward
        if key not in self.plans:
            plan = self.build(tower, grid_thw.cpu())
            self.plans[key] = {k: v.to(grid_thw.device) if torch.is_tensor(v) else v for k, v in plan.items()}
            while len(self.plans) > self.size:
                self.plans.popitem(last=False)
        self.plans.move_to_end(key)
        return self.plans[key]


def _inject_plan(cache: PlanCache) -> Callable:
    def hook(tower: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid_thw is None:
            return args, kwargs
        return args, {**cache.get(tower, grid_thw), **kwargs}  # the caller's own precomputed values win

    return hook


# ------------------------------------------------------------------ switching


def _attention_modules(tower: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for block in getattr(tower, "blocks", []):
        yield block.attn


def pack_vision_attention(tower: torch.nn.Module, plan: Callable[[Any, torch.Tensor], dict]) -> bool:
    """Switch `tower` to one packed attention call per layer and per-size plans (`plan` builds one), in
    place; True if it was switched (CUDA, varlen attention, transformers' vision helpers), False where it
    stays stock (the CPU)."""
    try:
        import transformers.vision_utils  # noqa: F401  (transformers >= 5.1x: towers take precomputed plans)
    except ImportError:
        return False
    parameter = next(tower.parameters(), None)
    if parameter is None or not varlen_available(parameter.device, parameter.dtype):
        return False
    if getattr(tower, _HOOK, None) is None:
        cache = PlanCache(plan)
        handle = tower.register_forward_pre_hook(_inject_plan(cache), with_kwargs=True)
        setattr(tower, _HOOK, (handle, cache))
    for attention in _attention_modules(tower):
        if type(attention) not in _PACKED_CLASSES.values():
            attention.__class__ = packed_class(type(attention))
    return True


def unpack_vision_attention(tower: torch.nn.Module) -> Callable | None:
    """The stock attention and plan derivation back; returns the plan builder that was in use (or None)."""
    packed = getattr(tower, _HOOK, None)
    if packed is None:
        return None
    handle, cache = packed
    handle.remove()
    setattr(tower, _HOOK, None)
    for attention in _attention_modules(tower):
        if type(attention) in _PACKED_CLASSES.values():
            attention.__class__ = type(attention).__mro__[1]
    return cache.build


def is_packed(tower: torch.nn.Module) -> bool:
    return getattr(tower, _HOOK, None) is not None


@contextmanager
def stock_vision_attention(tower: torch.nn.Module) -> Iterator[None]:
    """Inside, the tower runs stock (the benchmarks' plain rows, parity checks); after, as it was."""
    plan = unpack_vision_attention(tower)
    try:
        yield
    finally:
        if plan is not None:
            pack_vision_attention(tower, plan)

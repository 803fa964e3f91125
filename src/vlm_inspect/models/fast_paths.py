"""GPU fast paths, each measured where a family opts in (`Family.fast_paths`: LLaVA-1.5, Qwen2.5-VL,
Qwen3-VL): torch.compile'd layers for scoring and training, stacked q/k/v and gate/up weights, the greedy
decoder whose step is one CUDA-graph replay (M-RoPE positions too, `Family.prompt_positions`), and the
Qwen towers' packed attention (`Family.vision_plan`, models/qwen_vision.py). On a CPU none of them is used
(the greedy decoder runs there without its graph).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from vlm_inspect.models.families import family_of_model
from vlm_inspect.models.qwen_vision import pack_vision_attention

# Decoders are made per (batch, KV-cache length rounded up to this): prompts of similar length share one.
DECODE_LENGTH_STEP = 64
MAX_DECODERS = 3
# Decoding checks for finished answers every this many tokens: each check waits for the GPU.
EOS_CHECK_EVERY = 8
# Names of the vision towers' layer lists (CLIP, SigLIP: `layers`; the Qwen towers: `blocks`).
VISION_LAYER_LISTS = ("layers", "blocks")


def compile_slots(model: Any, prefill: bool = False) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of each module the GPU paths (and training) run through torch.compile, through a
    PEFT wrapper.

    Every vision-tower layer, and every language-model layer for scoring (one graph the layers share), or
    for a KV-cache prefill the language model whole: each attention writes the cache at its own layer's
    index, so a shared per-layer graph would recompile per layer; one graph of the whole model does not.
    Measured (7B shape): the prefill of one photo took 66 ms with the layers' MLPs and norms compiled and
    35 ms with the whole language model on an H100; describe on an H200 3.59 → 3.87 images/s at batch 1,
    20.34 → 20.86 at batch 8. The price: the first call of a batch size compiles for 80–95 s, not ~30 s.
    """
    family = family_of_model(model)
    vision = [
        getattr(m, name)
        for m in family.vision_tower(model).modules()
        for name in VISION_LAYER_LISTS
        if isinstance(getattr(m, name, None), torch.nn.ModuleList)
    ]
    slots = [(layers, str(i)) for layers in vision for i in range(len(layers))]
    if prefill:
        return [*slots, (family.inner(model), "language_model")]
    language = family.language_layers(model)
    return slots + [(language, str(i)) for i in range(len(language))]


def pack_vision(model: Any) -> bool:
    """On CUDA, the vision tower's attention as one packed call per layer where the family has a plan for
    it (`Family.vision_plan`: the Qwen towers); True if switched. Measured: models/qwen_vision.py."""
    plan = family_of_model(model).vision_plan
    return plan is not None and pack_vision_attention(family_of_model(model).vision_tower(model), plan)


class StackedProjection(torch.nn.Module):
    """One of several projections of the same input, read from one product with their stacked weight.

    The first of the group computes the whole product for an input and the others take their rows of it
    (or compute it themselves for another input). The decode step then streams q, k and v (and gate and
    up) in one GEMV each instead of three (two): at batch 1 a decode step is one pass over the weights,
    and small GEMVs run well below the memory bandwidth. Measured on an H200 (7B shape): describe
    3.68 → 3.87 images/s at batch 1, 19.91 → 20.86 at batch 8.
    """

    def __init__(self, stacked: torch.Tensor, start: int, stop: int, last: dict[str, torch.Tensor]):
        super().__init__()
        self.stacked, self.start, self.stop, self.last = stacked, start, stop, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == 0 or self.last.get("input") is not x:
            self.last["input"], self.last["product"] = x, torch.nn.functional.linear(x, self.stacked)
        return self.last["product"][..., self.start : self.stop]


def stacked_projections(model: Any, cache: dict[int, Any]) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, StackedProjection) for each language layer's q/k/v and gate/up projections.

    Only plain bias-free `nn.Linear`s are stacked (not LoRA or quantized layers). Their weights become views
    of the stacked one, so no memory is added; `cache` (the predictor's) keeps one set per model.
    """
    swaps = []
    for layer in family_of_model(model).language_layers(model):
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            linears = [getattr(parent, name) for name in names]
            if not all(type(m) is torch.nn.Linear and m.bias is None for m in linears):
                continue
            if id(parent) not in cache:
                cache[id(parent)] = _stack(linears)
            swaps += [(parent, name, part) for name, part in zip(names, cache[id(parent)], strict=True)]
    return swaps


def _stack(linears: list[torch.nn.Linear]) -> list[StackedProjection]:
    stacked = torch.cat([m.weight.detach() for m in linears])
    parts, start, last = [], 0, {}
    for m in linears:
        stop = start + m.out_features
        m.weight.data = stacked[start:stop]  # a view: the separate copies are freed
        parts.append(StackedProjection(stacked, start, stop, last))
        start = stop
    return parts


@contextlib.contextmanager
def swapped_modules(swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> Iterator[None]:
    """Inside, each (parent, attribute) holds the given module; after, the original again."""
    originals = [getattr(parent, name) for parent, name, _ in swaps]
    for parent, name, module in swaps:
        setattr(parent, name, module)
    try:
        yield
    finally:
        for (parent, name, _), module in zip(swaps, originals, strict=True):
            setattr(parent, name, module)


@contextlib.contextmanager
def compiled_modules(slots: list[tuple[torch.nn.Module, str]], compiled: dict[int, Any]) -> Iterator[None]:
    """Inside, each slot's module runs through its torch.compile wrapper (same weights); after, the originals.

    Measured on an H100 (7B shape): the scoring forward of 32 images 0.56 → 0.42 s, as norms, rotary,
    activations and residual adds fuse (compiling the whole model instead: 61.7 vs 66.5 images/s, and
    90 s to compile). Modules of one kind share a graph; the first call compiles it (~14 s). Callers hold
    the predictor's lock.
    """
    for parent, name in slots:
        module = getattr(parent, name)
        if id(module) not in compiled:
            compiled[id(module)] = torch.compile(module, dynamic=None)
    with swapped_modules([(parent, name, compiled[id(getattr(parent, name))]) for parent, name in slots]):
        yield


def adapter_active(model: Any) -> bool:
    """Whether LoRA layers are on (False inside `disable_adapter()`); True for a model without adapter."""
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "disable_adapters"):
            return not module.disable_adapters
    return True


class GreedyDecoder:
    """Greedy decoding for one batch size with a static KV cache.

    Prefill is one forward of the full model; each new token is one step of the language model over
    fixed-address buffers (token, position, slot, 4D mask built on the device), so on CUDA the step is
    captured once as a CUDA graph and replayed: no per-layer Python or kernel-launch cost per token,
    and no GPU-to-host wait except a finished-answers check every EOS_CHECK_EVERY tokens.
    """

    def __init__(
        self,
        model: Any,
        batch: int,
        cache_len: int,
        eos: int | list[int] | None,
        pad: int,
        compiled: dict[int, Any],
        stacked: dict[int, Any],
    ):
        from transformers import StaticCache

        self.net = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.family = family_of_model(model)
        self.inner = self.family.inner(model)
        self.lm, self.head = self.inner.language_model, self.net.lm_head
        self.batch, self.cache_len, self.pad = batch, cache_len, pad
        self.eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), dtype=torch.long)
        self.cache = StaticCache(config=self.net.config, max_cache_len=cache_len)
        # transformers 5.24 renamed the cache argument (past_key_values → cache).
        self.cache_arg = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        device, self.dtype = self.net.device, self.head.weight.dtype
        self.slots = torch.arange(cache_len, device=device)
        self.allowed = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.use_graph = device.type == "cuda"
        # Compiled, the step's ~40 small kernels per layer (norms, rotary, SiLU, LoRA adds) fuse into a few:
        # at batch 8 that halves the time per token. Compiling takes ~30 s once per batch size and length.
        self.step = torch.compile(self._step, dynamic=False) if self.use_graph else self._step
        # The prefill's compiled parts are the predictor's, shared by all its decoders (compiled_modules).
        self.prefill_slots = compile_slots(model, prefill=True) if self.use_graph else []
        self.compiled = compiled
        # The step reads q/k/v and gate/up each through one stacked weight (see StackedProjection).
        self.stacked = stacked_projections(model, stacked) if self.use_graph else []

    def run(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        """(batch, ≤ max_new_tokens) new token ids; after an end-of-sequence token, padding."""
        if self.use_graph and self.graph is None:
            self._capture(inputs)
        tokens = [self._prefill(inputs)]
        for index in range(1, max_new_tokens):
            if index % EOS_CHECK_EVERY == 0 and self._all_finished(tokens):
                break
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            tokens.append(self.token[:, 0].clone())
        return self._cut_after_eos(torch.stack(tokens, 1))

    def _prefill(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the prompts (images included) into the empty cache; the first new token."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        length = ids.shape[1]
        self.cache.reset()
        self.allowed.fill_(True)
        self.allowed[:, :length] = mask
        causal = self.slots[None, :] <= torch.arange(length, device=ids.device)[:, None]
        keep = (self.allowed[:, None, :] & causal) | (
            self.slots[None, :] == torch.arange(length, device=ids.device)[:, None]
        )
        position = self.prompt_positions(inputs)
        side = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}  # images, grids
        with compiled_modules(self.prefill_slots, self.compiled):
            out = self.inner(
                input_ids=ids,
                attention_mask=self._additive(keep[:, None]),
                position_ids=position,
                use_cache=True,
                **side,
                **{self.cache_arg: self.cache},
            )
        first = self.head(out.last_hidden_state[:, -1]).argmax(-1)
        self.token.copy_(first[:, None])
        # The step continues from the last prompt token (a text token: with M-RoPE its three axes are equal).
        self.position.copy_(position[..., -1:].reshape(-1, ids.shape[0], 1).amax(0) + 1)
        self.slot.fill_(length)
        return first

    def prompt_positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prompt's positions as `generate` computes them: the family's (M-RoPE: (3, batch, length)),
        else one per unpadded token (padding at 1)."""
        if self.family.prompt_positions is not None:
            return self.family.prompt_positions(self.net, inputs)
        mask = inputs["attention_mask"].bool()
        return (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)

    def _step(self) -> None:
        """One token for every row: reads and advances only the fixed buffers (capturable)."""
        visible = self.allowed & (self.slots <= self.slot)
        out = self.lm(
            inputs_embeds=self.lm.embed_tokens(self.token),
            attention_mask=self._additive(visible[:, None, None, :]),
            position_ids=self.position,
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        self.token.copy_(self.head(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True))
        self.position.add_(1)
        self.slot.add_(1)

    def _capture(self, inputs: dict[str, torch.Tensor]) -> None:
        """Warm the step up on a side stream, then record it; the cache is reset by the next prefill."""
        self._prefill(inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with swapped_modules(self.stacked):
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step()

    def _additive(self, keep: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask → the additive float mask attention adds to its scores."""
        zero = torch.zeros((), dtype=self.dtype, device=keep.device)
        return torch.where(keep, zero, torch.finfo(self.dtype).min)

    def _all_finished(self, tokens: list[torch.Tensor]) -> bool:
        if not self.eos.numel():
            return False
        eos = self.eos.to(tokens[0].device)
        return bool(torch.isin(torch.stack(tokens, 1), eos).any(1).all())

    def _cut_after_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.eos.numel():
            return tokens
        ended = torch.isin(tokens, self.eos.to(tokens.device)).long().cumsum(1)
        after = (ended - torch.isin(tokens, self.eos.to(tokens.device)).long()) > 0
        return tokens.masked_fill(after, self.pad)

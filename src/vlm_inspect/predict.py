"""The `Predictor` behind predict, evaluate and serve, and the `vlm-inspect predict` verb.

Two modes:
- score: one forward pass per batch; p(NG) is read from the next-token probabilities of the
  verdict words right after `ASSISTANT:`. No generation, no text parsing.
- describe: greedy generation of the answer text.

Run as: vlm-inspect predict --model M [--adapter A] PHOTOS... --out preds.jsonl
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm_inspect.config import PredictConfig, require
from vlm_inspect.data.dataset import square_image
from vlm_inspect.errors import ConfigError, DataError, ModelFolderError
from vlm_inspect.models.template import render_prompt

VERDICTS = ("OK", "NG")


def run_settings(adapter: str | Path | None) -> dict[str, Any]:
    """Language, product word and image aspect a run was trained with (defaults without a run)."""
    import yaml

    settings: dict[str, Any] = {"language": "en", "product": None, "image_aspect": "pad"}
    run_config = Path(adapter or "", "config.yaml") if adapter else None
    if run_config is None or not run_config.exists():
        return settings
    train_cfg = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
    settings["image_aspect"] = train_cfg.get("image_aspect", "pad")
    manifest = Path(str(train_cfg.get("data", "")), "manifest.json")
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        settings["language"] = data.get("language", "en")
        settings["product"] = data.get("product")
    return settings


def default_question(language: str = "en", product: str | None = None) -> str:
    """The first training question of the prompt templates: what tuned models were taught."""
    from vlm_inspect.data.prompts import load_prompts

    return load_prompts(language).default_question(product)


class Predictor:
    """A model loaded once (base, base + adapter, or merged) that scores and describes photos."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        name: str,
        has_adapter: bool,
        image_aspect: str = "pad",
        question: str | None = None,
    ):
        self.model, self.processor, self.name = model, processor, name
        self.has_adapter, self.image_aspect = has_adapter, image_aspect
        self.tokenizer = processor.tokenizer
        self.default_question = question or default_question()
        self.verdict_ids = verdict_token_ids(self.tokenizer)
        self.lock = threading.Lock()  # one user of the weights at a time (serve runs threads)
        self._decoders: OrderedDict[tuple, GreedyDecoder] = OrderedDict()
        self._compiled: dict[int, Any] = {}  # id(module) → its compiled wrapper (compiled_modules)
        self._stacked: dict[int, Any] = {}  # id(attention or MLP) → its StackedProjections

    @classmethod
    def load(
        cls,
        model: str | Path,
        adapter: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> Predictor:
        """Load weights once; with an adapter, `adapter_disabled()` gives the base on the same weights."""
        from vlm_inspect.models.adapter import attach_adapter
        from vlm_inspect.models.fp8 import to_fp8
        from vlm_inspect.models.load import load_model, load_processor

        processor = load_processor(model)
        net = load_model(model, dtype=dtype, device=device)
        name = Path(model).name
        if adapter is not None:
            net = attach_adapter(net, adapter)
            name = f"{name} + {Path(adapter).name}"
        if dtype == "fp8":
            to_fp8(net)
        settings = run_settings(adapter)
        question = default_question(settings["language"], settings["product"])
        return cls(net.eval(), processor, name, adapter is not None, settings["image_aspect"], question)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Inside, the same loaded weights act as the base model (PEFT's disable_adapter)."""
        if not self.has_adapter:
            raise ModelFolderError(f"{self.name}: no adapter loaded, so there is no base to switch to")
        with self.model.disable_adapter():
            yield

    def warm_up(self, max_batch: int, max_new_tokens: int) -> None:
        """On a GPU, compile what the first requests would: scoring at batch 1 and `max_batch` (later sizes
        reuse that graph) and describing one photo. Each first call compiles for 0.5–1.5 minutes, which a
        service would otherwise spend inside its first requests' time limit. On a CPU nothing compiles."""
        if self.device.type != "cuda":
            return
        blank = Image.new("RGB", (64, 64), "white")
        for batch in sorted({1, max_batch}):
            self.score([blank] * batch, batch_size=batch)
        self.describe([blank], max_new_tokens=max_new_tokens)

    def _inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        mean = self.processor.image_processor.image_mean
        squared = [square_image(im.convert("RGB"), mean, self.image_aspect) for im in images]
        # The torchvision image processor resizes and normalises on the GPU when given the device:
        # on the CPU that takes a quarter of a 7B scoring pass.
        on_gpu = self.device.type == "cuda" and _resizes_with_torch(self.processor.image_processor)
        extra = {"device": self.device} if on_gpu else {}
        inputs = self.processor(images=squared, text=list(prompts), return_tensors="pt", padding=True, **extra)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if k == "pixel_values" else v.to(self.device)) for k, v in inputs.items()}

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], question: str | None = None, batch_size: int = 8) -> list[float]:
        """p(NG) per image from one forward pass per batch (only the last position's logits)."""
        prompt = render_prompt(question or self.default_question)
        ok_ids, ng_ids = self.verdict_ids
        out: list[float] = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            with self.lock:
                inputs = self._inputs(batch, [prompt] * len(batch))
                logits = self._last_logits(inputs)
            probs = logits.softmax(-1)
            p_ok, p_ng = probs[:, ok_ids].sum(-1), probs[:, ng_ids].sum(-1)
            out.extend((p_ng / (p_ok + p_ng).clamp_min(1e-12)).tolist())
        return out

    def _last_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 next-token logits after each prompt, (batch, vocab); on CUDA through compiled layers."""
        on_gpu = self.device.type == "cuda"
        compiled = compiled_modules(compile_slots(self.model), self._compiled) if on_gpu else contextlib.nullcontext()
        with compiled:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1].float()

    def describe(
        self,
        images: Sequence[Image.Image],
        question: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 8,
    ) -> list[str]:
        """Greedy answers to the question, one per image."""
        prompt = render_prompt(question or self.default_question)
        answers: list[str] = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            answers.extend(self.generate(batch, [prompt] * len(batch), max_new_tokens))
        return answers

    @torch.inference_mode()
    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> list[str]:
        """Answers to fully rendered prompts (see models.template.render_prompt).

        Greedy answers come from `GreedyDecoder` (static KV cache; on a GPU one CUDA-graph replay per
        token), which gives the same tokens as transformers' `generate`; sampling goes through `generate`.
        """
        with self.lock:
            if temperature > 0:
                inputs = self._inputs(images, prompts)
                ids = self.model.generate(**inputs, **self._sampling(max_new_tokens, temperature))
                new = ids[:, inputs["input_ids"].shape[1] :]
            else:
                # Batches are padded to a power of two with copies of the last row: a server's changing
                # batch sizes then need only a few decoders (each compiles and holds a KV cache).
                extra = (1 << (len(images) - 1).bit_length()) - len(images)
                inputs = self._inputs([*images, *[images[-1]] * extra], [*prompts, *[prompts[-1]] * extra])
                decoder = self._decoder(inputs["input_ids"].shape, max_new_tokens)
                new = decoder.run(inputs, max_new_tokens)[: len(images)]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _decoder(self, shape: torch.Size, max_new_tokens: int) -> GreedyDecoder:
        """A decoder for this batch size and length bucket, kept for reuse (its CUDA graph is the costly part)."""
        batch, length = shape
        cache_len = -(-(length + max_new_tokens) // DECODE_LENGTH_STEP) * DECODE_LENGTH_STEP
        key = (batch, cache_len, adapter_active(self.model))
        if key not in self._decoders:
            while len(self._decoders) >= MAX_DECODERS:  # each holds a KV cache: keep memory bounded
                self._decoders.popitem(last=False)
            eos = self.model.generation_config.eos_token_id
            self._decoders[key] = GreedyDecoder(
                self.model, batch, cache_len, eos, self.tokenizer.pad_token_id, self._compiled, self._stacked
            )
        self._decoders.move_to_end(key)
        return self._decoders[key]

    def stream(
        self, image: Image.Image, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0
    ) -> Iterator[str]:
        """Text pieces of one answer as they are generated."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = self._inputs([image], [prompt])

        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self.lock, torch.inference_mode():
                    self.model.generate(**inputs, streamer=streamer, **self._sampling(max_new_tokens, temperature))
            except BaseException as err:  # handed to the consumer below instead of dying in this thread
                failure.append(err)
            finally:
                streamer.end()  # a failed generate would otherwise leave the consumer waiting forever

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from (piece for piece in streamer if piece)
        worker.join()
        if failure:
            raise failure[0]

    def _sampling(self, max_new_tokens: int, temperature: float) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        if temperature > 0:
            return {
                "max_new_tokens": max_new_tokens,
                "do_sample": True,
                "temperature": temperature,
                "pad_token_id": pad,
            }
        return {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}


# Decoders are made per (batch, KV-cache length rounded up to this): prompts of similar length share one.
DECODE_LENGTH_STEP = 64
MAX_DECODERS = 3
# Decoding checks for finished answers every this many tokens: each check waits for the GPU.
EOS_CHECK_EVERY = 8


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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = [
        m.layers
        for m in base.model.vision_tower.modules()
        if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)
    ]
    slots = [(layers, str(i)) for layers in vision for i in range(len(layers))]
    if prefill:
        return [*slots, (base.model, "language_model")]
    language = base.model.language_model.layers
    return slots + [(language, str(i)) for i in range(len(language))]


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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    swaps = []
    for layer in base.model.language_model.layers:
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


def _resizes_with_torch(image_processor: Any) -> bool:
    """Whether the image processor is transformers' torchvision one (it takes a `device`)."""
    return any(cls.__name__ == "TorchvisionBackend" for cls in type(image_processor).__mro__)


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

        self.llava = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.lm, self.head = self.llava.model.language_model, self.llava.lm_head
        self.batch, self.cache_len, self.pad = batch, cache_len, pad
        self.eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), dtype=torch.long)
        self.cache = StaticCache(config=self.llava.config, max_cache_len=cache_len)
        # transformers 5.24 renamed the cache argument (past_key_values → cache).
        self.cache_arg = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        device, self.dtype = self.llava.device, self.head.weight.dtype
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
        position = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        with compiled_modules(self.prefill_slots, self.compiled):
            out = self.llava.model(
                input_ids=ids,
                pixel_values=inputs.get("pixel_values"),
                attention_mask=self._additive(keep[:, None]),
                position_ids=position,
                use_cache=True,
                **{self.cache_arg: self.cache},
            )
        first = self.head(out.last_hidden_state[:, -1]).argmax(-1)
        self.token.copy_(first[:, None])
        self.position.copy_(position[:, -1:] + 1)
        self.slot.fill_(length)
        return first

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


def verdict_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """First token of each way an answer can start with OK or NG after `ASSISTANT:`.

    Tokenizers split ' OK' differently (one token, or '▁O'+'K'); the first token that follows
    the prompt is what the model's next-token distribution ranks, whatever the split.
    """
    prefix = tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]
    ids: dict[str, list[int]] = {}
    for word in VERDICTS:
        found = set()
        for variant in (f" {word}", word):
            full = tokenizer(f"ASSISTANT:{variant}", add_special_tokens=False)["input_ids"]
            if full[: len(prefix)] == prefix and len(full) > len(prefix):
                found.add(full[len(prefix)])
        ids[word] = sorted(found)
    if not ids["OK"] or not ids["NG"] or set(ids["OK"]) & set(ids["NG"]):
        raise ModelFolderError(f"the tokenizer cannot tell OK from NG by their first token: {ids}")
    return ids["OK"], ids["NG"]


# ------------------------------------------------------------------ the verb


def validate(cfg: PredictConfig) -> None:
    problems = require(cfg, "model", "paths", "out")
    if not 0 <= cfg.threshold <= 1:
        problems.append(f"threshold: {cfg.threshold} is not in [0, 1]")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        problems.append("batch_size and max_new_tokens must be at least 1")
    if Path(cfg.out).suffix not in (".jsonl", ".csv"):
        problems.append(f"out: {cfg.out} must end in .jsonl or .csv")
    if Path(cfg.out).exists() and not cfg.overwrite:
        problems.append(f"out: {cfg.out} exists; pass --overwrite to replace it")
    if problems:
        raise ConfigError(problems)


def predict(cfg: PredictConfig) -> Path:
    """Score (and describe) every image under cfg.paths; one row per image, errors in their row."""
    from rich.progress import Progress

    from vlm_inspect.data.images import find_images, load_image

    validate(cfg)
    paths = find_images(cfg.paths)
    if not paths:
        raise DataError(f"no images found under {', '.join(cfg.paths)}")
    predictor = Predictor.load(cfg.model, cfg.adapter, device=cfg.device, dtype=cfg.precision)
    rows: list[dict] = []
    with Progress() as progress:
        task = progress.add_task("inspecting", total=len(paths))
        for start in range(0, len(paths), cfg.batch_size):
            rows.extend(_predict_batch(predictor, paths[start : start + cfg.batch_size], cfg, load_image))
            progress.advance(task, len(paths[start : start + cfg.batch_size]))
    out = write_rows(rows, Path(cfg.out))
    n_ng = sum(r["verdict"] == "NG" for r in rows)
    n_err = sum(r["verdict"] == "ERROR" for r in rows)
    print(f"{len(rows)} images: {n_ng} NG, {len(rows) - n_ng - n_err} OK, {n_err} unreadable → {out}")
    return out


def _predict_batch(predictor: Predictor, paths: list[Path], cfg: PredictConfig, load_image: Any) -> list[dict]:
    images, rows = [], []
    for path in paths:
        try:
            images.append(load_image(path))
            rows.append({"path": str(path)})
        except DataError as err:
            rows.append({"path": str(path), "verdict": "ERROR", "p_ng": None, "error": str(err)})
    good = [r for r in rows if "error" not in r]
    if not good:
        return rows
    start = time.perf_counter()
    p_ng = predictor.score(images, cfg.question, batch_size=len(images))
    answers = predictor.describe(images, cfg.question, cfg.max_new_tokens, len(images)) if cfg.describe else None
    ms = 1000 * (time.perf_counter() - start) / len(images)
    for i, row in enumerate(good):
        row.update(verdict="NG" if p_ng[i] >= cfg.threshold else "OK", p_ng=round(p_ng[i], 6), ms=round(ms, 1))
        if answers is not None:
            row["description"] = answers[i]
    return rows


def write_rows(rows: list[dict], out: Path) -> Path:
    """Rows as JSON lines or CSV, written to a temporary file and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".csv":
        fields = ["path", "verdict", "p_ng", "description", "ms", "error"]
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    return out

"""The `Predictor`: a model loaded once that predict, evaluate, serve and watch all use.

Two modes:
- score: one forward pass per batch; p(NG) is read from the next-token probabilities of the
  verdict words right after the generation prompt (`ASSISTANT:`, `<|im_start|>assistant\n`, ...).
  No generation, no text parsing.
- describe: greedy generation of the answer text.

`Predictor.load` takes the whole model-settings group (`config.ModelSettings`); what the run taught (its
image-token budget, image aspect, language, product word and questions) comes from the run folder or a merged
model folder, never from the training data.

References: a photo is judged against a set of known-good photos (`data.reference.Reference`) shown first, as
image parts of their own before the photo's, its question after the sentence that says so (the
run's `reference_intro`). The default of every call is the predictor's `reference`: the `reference` setting, else
the run's own (a run folder's `reference/`, a merged model's `train_reference/`), else none. Every method takes
`reference=` to judge against another set for that call (`NO_REFERENCE`: the photo alone), and
`reference_for(reference)` says which set a call with it uses, so a caller records what each verdict was judged
against (`Reference.record()`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm_inspect.config import ModelSettings, TrainConfig, image_budget_problems
from vlm_inspect.data.images import model_input_size, square_image
from vlm_inspect.data.reference import NO_REFERENCE, Reference
from vlm_inspect.errors import ModelFolderError
from vlm_inspect.folders import DatasetFacts, ModelFolder, open_adapter
from vlm_inspect.models.boxes import View, read_boxes
from vlm_inspect.models.chat import prompt as render_prompt
from vlm_inspect.models.families import family_of_model
from vlm_inspect.models.fast_paths import (
    DECODE_LENGTH_STEP,
    MAX_DECODERS,
    GreedyDecoder,
    adapter_active,
    compile_slots,
    compiled_modules,
    pack_vision,
)

VERDICTS = ("OK", "NG")
MAX_NEW_TOKENS = 128
"""Longest generated answer by default: a verdict sentence and a few boxes (a box takes ~25 tokens)."""


@dataclass
class Answer:
    """What a generated answer says about one photo."""

    text: str | None
    """The answer without its boxes (None when only the boxes were asked for)."""
    defects: list[dict]
    """`[{"type": ..., "box": [x0, y0, x1, y1]}]` in the photo's pixels, clamped to the photo."""
    boxes_dropped: int = 0
    """Boxes the model wrote that could not be used (unparseable, inverted, off the photo, too many)."""


def trained_with(settings: ModelSettings, model: ModelFolder) -> tuple[TrainConfig | None, DatasetFacts]:
    """The settings and dataset facts of the run behind a model: the adapter's run folder, else a merged
    model's copies of them; (None, defaults) for a base model or a bare adapter."""
    if settings.adapter:
        _, run = open_adapter(settings.adapter)
        trained, facts = (run.config(), run.facts()) if run else (None, None)
    else:
        trained, facts = model.trained(), model.facts()
    return trained, facts or DatasetFacts()


def trained_reference(settings: ModelSettings, model: ModelFolder) -> Reference:
    """The references a model is judged with by default: the `reference` setting (a photo or folder, `none`),
    else the run's (the adapter's run folder, or a merged model's copy), else none."""
    if settings.reference == "none":
        return NO_REFERENCE
    if settings.reference != "run":
        return Reference.from_paths(Path(settings.reference).name, [settings.reference])
    if settings.adapter:
        _, run = open_adapter(settings.adapter)
        return run.reference() if run else NO_REFERENCE
    return model.reference()


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
        settings: ModelSettings | None = None,
        locate_question: str | None = None,
        reference: Reference = NO_REFERENCE,
        facts: DatasetFacts | None = None,
    ):
        self.model, self.processor, self.name = model, processor, name
        self.has_adapter, self.image_aspect = has_adapter, image_aspect
        self.settings = settings or ModelSettings()
        """The model settings in force (image_max_tokens resolved to the budget the processor applies)."""
        self.tokenizer = processor.tokenizer
        self.family = family_of_model(model)
        pack_vision(model)  # on CUDA, the Qwen towers' attention as one call per layer (models/qwen_vision.py)
        self.facts = facts or DatasetFacts()
        """The run's wording: language, product, and the sentence that introduces references."""
        self.reference = reference
        """The known-good photos every call judges against unless it names others (none: the photo alone)."""
        self.default_question = question or DatasetFacts().default_question()
        self.locate_question = locate_question or DatasetFacts().locate_wordings()[0]
        self.verdict_ids = verdict_token_ids(self.tokenizer, render_prompt(processor, self.default_question))
        self.lock = threading.Lock()  # one user of the weights at a time (serve runs threads)
        self._decoders: OrderedDict[tuple, GreedyDecoder] = OrderedDict()
        self._compiled: dict[int, Any] = {}  # id(module) → its compiled wrapper (compiled_modules)
        self._stacked: dict[int, Any] = {}  # id(attention or MLP) → its StackedProjections

    @classmethod
    def load(cls, settings: ModelSettings) -> Predictor:
        """Load weights once; with an adapter, `adapter_disabled()` gives the base on the same weights.

        The image-token budget is the setting's, else the run's (the adapter's run folder, or a merged model's
        copy of it), else the family's default."""
        from vlm_inspect.models.adapter import attach_adapter
        from vlm_inspect.models.fp8 import to_fp8
        from vlm_inspect.models.load import load_model, load_processor

        folder = ModelFolder.open(settings.model)
        trained, facts = trained_with(settings, folder)
        budget = settings.image_max_tokens or (trained.image_max_tokens if trained else None)
        saved = [] if settings.image_max_tokens else image_budget_problems(budget)  # a run's config.yaml, hand-edited
        if saved:
            raise ModelFolderError(f"{settings.adapter or folder.path}: the run's settings say {saved[0]}")
        budget = budget or folder.family.default_image_max_tokens
        in_force = dataclasses.replace(settings.model_settings(), image_max_tokens=budget)
        processor = load_processor(folder, budget)
        net = load_model(folder, dtype=settings.precision, device=settings.device)
        name = folder.name
        if settings.adapter is not None:
            net = attach_adapter(net, settings.adapter)
            name = f"{name} + {Path(settings.adapter).name}"
        if settings.precision == "fp8":
            to_fp8(net)
        aspect = trained.image_aspect if trained else "pad"
        reference = trained_reference(settings, folder)
        question, locate = facts.default_question(), facts.locate_wordings()[0]
        has_adapter = settings.adapter is not None
        return cls(net.eval(), processor, name, has_adapter, aspect, question, in_force, locate, reference, facts)

    @property
    def product(self) -> str:
        """The product word its run was trained on (`prepare --product`), or `product`: a station keeps one golden
        set per product (station/references.py)."""
        return self.facts.product or "product"

    def reference_for(self, reference: Reference | None = None) -> Reference:
        """The references a call given `reference` judges against: that set, or this predictor's default."""
        return self.reference if reference is None else reference

    def prompt(
        self, question: str, history: list[tuple[str, str]] | None = None, reference: Reference | None = None
    ) -> str:
        """`question` (after earlier turns) in this model's chat format, ready for `generate` or `stream` with the
        same `reference`: its first question after the sentence that introduces the references."""
        reference = self.reference_for(reference)
        turns = [*(history or []), (question, None)]
        first, answer = turns[0]
        turns[0] = (self.facts.reference_question(first, len(reference)), answer)
        images = len(reference) + 1  # an image part for each reference, then the photo's
        return render_prompt(self.processor, turns[-1][0], turns[:-1], images)

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

    def _inputs(
        self, images: Sequence[Image.Image], prompts: Sequence[str], reference: Reference | None = None
    ) -> dict[str, torch.Tensor]:
        aspect = self.image_aspect if self.family.square_pad else "native"
        mean = self.processor.image_processor.image_mean
        references = list(self.reference_for(reference).images)
        squared = [[square_image(r, mean, aspect) for r in [*references, im.convert("RGB")]] for im in images]
        # The torchvision image processor resizes and normalises on the GPU when given the device:
        # on the CPU that takes a quarter of a 7B scoring pass.
        on_gpu = self.device.type == "cuda" and _resizes_with_torch(self.processor.image_processor)
        extra = {"device": self.device} if on_gpu else {}
        inputs = self.processor(images=squared, text=list(prompts), return_tensors="pt", padding=True, **extra)
        self.family.check_side_inputs(self.model, inputs, self.name)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if k == "pixel_values" else v.to(self.device)) for k, v in inputs.items()}

    @torch.inference_mode()
    def score(
        self,
        images: Sequence[Image.Image],
        question: str | None = None,
        batch_size: int = 8,
        reference: Reference | None = None,
    ) -> list[float]:
        """p(NG) per image from one forward pass per batch (only the last position's logits), each judged against
        `reference` (default: this predictor's)."""
        prompt = self.prompt(question or self.default_question, reference=reference)
        ok_ids, ng_ids = self.verdict_ids
        out: list[float] = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            with self.lock:
                inputs = self._inputs(batch, [prompt] * len(batch), reference)
                logits = self._last_logits(inputs)
            probs = logits.softmax(-1)
            p_ok, p_ng = probs[:, ok_ids].sum(-1), probs[:, ng_ids].sum(-1)
            out.extend((p_ng / (p_ok + p_ng).clamp_min(1e-12)).tolist())
        return out

    def _last_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 next-token logits after each prompt, (batch, vocab); on CUDA through compiled layers."""
        fast = self.device.type == "cuda" and self.family.fast_paths
        compiled = compiled_modules(compile_slots(self.model), self._compiled) if fast else contextlib.nullcontext()
        with compiled:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1].float()

    def describe(
        self,
        images: Sequence[Image.Image],
        question: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        batch_size: int = 8,
        reference: Reference | None = None,
    ) -> list[str]:
        """Greedy answers to the question, one per image, as the model writes them (boxes in its own frame)."""
        prompt = self.prompt(question or self.default_question, reference=reference)
        answers: list[str] = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            answers.extend(self.generate(batch, [prompt] * len(batch), max_new_tokens, reference=reference))
        return answers

    def answers(
        self,
        images: Sequence[Image.Image],
        question: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        batch_size: int = 8,
        reference: Reference | None = None,
    ) -> list[Answer]:
        """`describe`, each answer read: its prose, and the defects it boxes in the photo's pixels."""
        texts = self.describe(images, question, max_new_tokens, batch_size, reference)
        return [self.read_answer(text, image) for text, image in zip(texts, images, strict=True)]

    def locate(
        self,
        images: Sequence[Image.Image],
        max_new_tokens: int = MAX_NEW_TOKENS,
        batch_size: int = 8,
        reference: Reference | None = None,
    ) -> list[Answer]:
        """Only the boxes: the answers to the run's locate question (one generation per photo)."""
        return self.answers(images, self.locate_question, max_new_tokens, batch_size, reference)

    def read_answer(self, text: str, image: Image.Image) -> Answer:
        """An answer about `image` split into prose and defects, its boxes mapped back to the photo's pixels
        through the same view the model's input took (models/boxes.py); boxes it wrote badly are counted."""
        prose, defects, dropped = read_boxes(self.family.box_text, self.view(image.size), text)
        return Answer(prose, defects, dropped)

    def view(self, photo: tuple[int, int]) -> View:
        """How a photo of this size reaches the model, and the frame of its answers' boxes (references, each an
        image part of its own, change neither)."""
        return self.family.view(self.processor, photo, model_input_size(*photo), self.image_aspect)

    @torch.inference_mode()
    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = 0.0,
        reference: Reference | None = None,
    ) -> list[str]:
        """Answers to fully rendered prompts (`prompt`, with the same `reference`).

        For families with the fast paths, greedy answers come from `GreedyDecoder` (static KV cache; on a GPU
        one CUDA-graph replay per token), which gives the same tokens as transformers' `generate`; sampling,
        and the other families, go through `generate`.
        """
        with self.lock:
            if temperature > 0 or not self.family.fast_paths:
                inputs = self._inputs(images, prompts, reference)
                ids = self.model.generate(**inputs, **self._sampling(max_new_tokens, temperature))
                new = ids[:, inputs["input_ids"].shape[1] :]
            else:
                # Batches are padded to a power of two with copies of the last row: a server's changing
                # batch sizes then need only a few decoders (each compiles and holds a KV cache).
                extra = (1 << (len(images) - 1).bit_length()) - len(images)
                padded = [*images, *[images[-1]] * extra], [*prompts, *[prompts[-1]] * extra]
                inputs = self._inputs(*padded, reference)
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
        self,
        image: Image.Image,
        prompt: str,
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = 0.0,
        reference: Reference | None = None,
    ) -> Iterator[str]:
        """Text pieces of one answer as they are generated (`prompt` rendered with the same `reference`)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = self._inputs([image], [prompt], reference)

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
        greedy = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
        if self.device.type == "cuda":
            # A static KV cache, which transformers compiles: on the Qwen2.5-VL-7B shape (H200) the stock setup's
            # describe ran 1.76 images/s at batch 1 with it against 0.81 with the default dynamic cache
            # (benchmarks/results/h200-qwen2_5_vl.json). Families with `fast_paths` use GreedyDecoder instead.
            greedy["cache_implementation"] = "static"
        return greedy


def _resizes_with_torch(image_processor: Any) -> bool:
    """Whether the image processor is transformers' torchvision one (it takes a `device`)."""
    return any(cls.__name__ == "TorchvisionBackend" for cls in type(image_processor).__mro__)


def verdict_token_ids(tokenizer: Any, prompt: str = "ASSISTANT:") -> tuple[list[int], list[int]]:
    """First token of each way an answer can start with OK or NG right after `prompt` (the rendered prompt).

    Tokenizers split ' OK' differently (one token, or '▁O'+'K'), and the answer starts with a space after
    LLaVA's `ASSISTANT:` but not after ChatML's `assistant\n`: the first token that follows the prompt in
    context is what the model's next-token distribution ranks, whatever the split.
    """
    prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids: dict[str, list[int]] = {}
    for word in VERDICTS:
        found = set()
        for variant in (f" {word}", word):
            full = tokenizer(f"{prompt}{variant}", add_special_tokens=False)["input_ids"]
            if full[: len(prefix)] == prefix and len(full) > len(prefix):
                found.add(full[len(prefix)])
        ids[word] = sorted(found)
    if not ids["OK"] or not ids["NG"] or set(ids["OK"]) & set(ids["NG"]):
        raise ModelFolderError(f"the tokenizer cannot tell OK from NG by their first token: {ids}")
    return ids["OK"], ids["NG"]

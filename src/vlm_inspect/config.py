"""Typed settings for every verb, read from YAML files and `key=value` overrides.

Each verb takes one dataclass. A field's docstring (the string literal under it) is its
help text: `vlm-inspect VERB --help` lists them. Validation collects every problem and
raises one `ConfigError`; the resolved settings are written beside every output.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from vlm_inspect.errors import ConfigError

C = TypeVar("C")

RESOLVED_CONFIG_NAME = "config.yaml"

IMAGE_TOKENS_MIN, IMAGE_TOKENS_MAX = 16, 65_536
"""Bounds of `image_max_tokens` for every verb: fewer than 16 tokens leaves a photo a few pixels; more than
65,536 is no photo a 2,048 px model input can cost."""


def image_budget_problems(value: int | None) -> list[str]:
    """The one check of `image_max_tokens`, shared by every verb that takes it."""
    if value is None or IMAGE_TOKENS_MIN <= value <= IMAGE_TOKENS_MAX:
        return []
    return [
        f"image_max_tokens: {value} is not between {IMAGE_TOKENS_MIN:,} and {IMAGE_TOKENS_MAX:,} "
        "(leave it unset for the run's or the family's own)"
    ]


@dataclass
class ModelSettings:
    """The model a verb runs: one group embedded in the settings of predict, evaluate, serve and watch, and
    taken whole by `Predictor.load`, so no path can drop one of them."""

    model: str = ""
    """Model folder: a base model (with --adapter) or a merged one."""
    adapter: str | None = None
    """Adapter or run folder (from `train`) applied on top of model."""
    image_max_tokens: int | None = None
    """Most image tokens one photo may cost (Qwen2.5-VL: one per 28 × 28 px, Qwen3-VL: 32 × 32, InternVL: 256 per 448 px tile); unset: the run's, else 1280. Fixed-view families (LLaVA-1.5: 576, Gemma 3: 256) ignore it."""
    device: str = "auto"
    """cpu, cuda, cuda:1 ... or auto (the first GPU, else the CPU)."""
    precision: Literal["auto", "bf16", "fp16", "fp32", "fp8"] = "auto"
    """Weights' precision; auto is bf16 on a GPU that has it, fp32 on CPU. fp8: the language-model
    linears stored and run in FP8 (the rest bf16), on GPUs of compute capability 8.9+."""
    reference: str = "run"
    """Known-good photos each photo is judged against: run (serve and watch with a station: its golden set for the product when one is chosen; else the run's own references, or the merged model's; none for a model without), none (the photo alone), or a photo or a folder of them."""

    def model_settings(self) -> ModelSettings:
        """This group alone (a copy), as `Predictor.load` takes it."""
        return ModelSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSettings)})

    def model_problems(self) -> list[str]:
        problems = [] if self.model else ["model: required"]
        if self.reference not in ("run", "none") and not Path(self.reference).exists():
            problems.append(f"reference: {self.reference} is not run, none, or a photo or folder of known-good photos")
        return problems + image_budget_problems(self.image_max_tokens)


@dataclass
class PrepareConfig:
    """Turn photo folders into conversation datasets (train.json, val.json) that teach verdict, defect type and place."""

    positional: ClassVar[str] = "src"

    src: str = ""
    """Folder of photos: class folders (ok/, ng/, ng/<defect>/...) or an MVTec AD category."""
    out: str = ""
    """Dataset folder to create (train.json, val.json, images/, manifest.json)."""
    val_fraction: float = 0.2
    """Share of images held out for validation, split per class and defect type."""
    seed: int = 0
    """Seed for the split and for the choice of question wording."""
    language: Literal["en", "zh"] = "en"
    """Language of questions and answers."""
    ok_names: list[str] = field(default_factory=list)
    """Extra folder names that mean OK, besides ok/good/pass/normal."""
    ng_names: list[str] = field(default_factory=list)
    """Extra folder names that mean NG, besides ng/bad/defect/defective/fail/anomaly."""
    from_llava_json: str | None = None
    """Read an existing LLaVA conversation JSON instead of class folders."""
    image_folder: str | None = None
    """With from_llava_json: the folder its `image` paths are relative to."""
    product: str = "product"
    """What the photos show, used in questions and answers (e.g. 'box')."""
    max_image_pixels: int = 100_000_000
    """Images larger than this many pixels are skipped (decompression-bomb guard)."""
    reference: str = "auto"
    """Known-good photos shown before every photo: auto (the source's reference/ folder if it has one, else none), ok (the most typical OK photos, taken out of the samples), a folder of photos, or none (one photo per conversation, as without references)."""
    reference_count: int = 1
    """With reference=ok: how many OK photos become references (each costs a photo's image tokens per sample)."""
    overwrite: bool = False
    """Replace an existing non-empty output folder."""


@dataclass
class TrainConfig:
    """Fine-tune with LoRA, QLoRA or fully, on 1 or N devices."""

    model: str = ""
    """Base model folder (llava-hf layout; `vlm-inspect convert` makes one from the original layout)."""
    data: str = ""
    """Dataset folder from `vlm-inspect prepare`, or a LLaVA JSON file (images relative to it)."""
    out: str = ""
    """Run folder to write: adapter/, checkpoints/, metrics.jsonl, config.yaml."""
    method: Literal["lora", "qlora", "full"] = "lora"
    """lora: low-rank adapters; qlora: the same on a 4-bit base with 8-bit AdamW (CUDA only); full: all LM weights."""
    lora_r: int = 128
    """LoRA rank (LLaVA-1.5 task-LoRA recipe: 128)."""
    lora_alpha: int = 256
    """LoRA scaling alpha (recipe: 256)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (LLaVA used 0.05; 0 skips a copy of every layer input: see benchmarks/README)."""
    lr: float = 2e-4
    """Peak learning rate of the language-model weights being trained."""
    projector_lr: float = 2e-5
    """Learning rate of the multimodal projector, which is trained fully."""
    train_projector: bool = True
    """Train the vision-to-language projector (LLaVA recipe: yes)."""
    train_vision_tower: bool = False
    """Also train the vision tower (method=full only); LLaVA keeps it frozen."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.03
    """Share of steps spent warming up; never fewer than needed to keep every step's lr above 0."""
    epochs: float | None = None
    """Passes over the data; unset means enough passes to reach min_steps."""
    min_steps: int = 100
    """With epochs unset, the least number of optimizer steps a run takes (tiny data needs many)."""
    batch_size: int | None = None
    """Samples per device per step; unset picks one that fits the device memory."""
    grad_accum: int = 1
    """Steps whose gradients are summed before each optimizer step."""
    max_length: int = 2048
    """Most tokens per sample, image tokens included; longer samples are an error, never cut."""
    image_aspect: Literal["pad", "crop"] = "pad"
    """pad: LLaVA-1.5's square padding with the mean colour; crop: centre crop (fixed-view families only)."""
    image_max_tokens: int | None = None
    """Most image tokens one photo may cost (Qwen2.5-VL: one per 28 × 28 px, Qwen3-VL: 32 × 32, InternVL: 256 per 448 px tile); unset: 1280, saved in the run for every later verb. Fixed-view families (LLaVA-1.5: 576, Gemma 3: 256) ignore it."""
    augment: bool = True
    """Few-shot augmentation: flips, small rotations, brightness/contrast, mild crops."""
    gradient_checkpointing: bool | None = None
    """Recompute activations to save memory; unset recomputes as few layers as the GPU memory needs."""
    compile: bool | None = None
    """torch.compile the language-model layers; unset: on for CUDA GPUs (one process, ddp, zero2, fsdp), off on CPU and under zero3."""
    precision: Literal["auto", "bf16", "fp16", "fp32", "fp8"] = "auto"
    """Compute precision; auto is bf16 on a GPU that has it, fp32 on CPU. fp8: the frozen language-model
    linears stored and run in FP8 (the rest bf16), LoRA only, on GPUs of compute capability 8.9+."""
    seed: int = 0
    """Seed for initialisation, shuffling and augmentation."""
    gpus: str | None = None
    """GPU ids to use, e.g. '0,2' (instead of CUDA_VISIBLE_DEVICES or --include)."""
    distributed: Literal["ddp", "zero2", "zero3", "fsdp"] | None = None
    """Launch one process per GPU through `accelerate launch` with this shipped config."""
    save_fraction: float = 0.1
    """Save a checkpoint every this share of the run."""
    save_total_limit: int = 2
    """Checkpoints kept; older ones are deleted."""
    logging_steps: int = 1
    """Optimizer steps between log lines and metrics.jsonl rows."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Extra metric logger; metrics.jsonl is always written."""
    resume: bool = False
    """Continue from the newest complete checkpoint in out."""
    overwrite: bool = False
    """Replace a finished run in out."""
    num_workers: int | None = None
    """Data-loader worker processes; unset: 4 on a GPU (images decode while the GPU trains), 0 on CPU."""


@dataclass
class MergeConfig:
    """Merge an adapter into its base and check the merged model answers like the adapter."""

    model: str = ""
    """Base model folder the adapter was trained on."""
    adapter: str = ""
    """Run folder from `vlm-inspect train` or an adapter folder."""
    out: str = ""
    """Folder to write the merged model to."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Precision of the saved merged weights."""
    overwrite: bool = False
    """Replace an existing output folder."""


@dataclass
class ConvertConfig:
    """Convert original LLaVA checkpoints and LoRA runs to the llava-hf / PEFT layout."""

    out: str = ""
    """Folder to write."""
    llava: str | None = None
    """Original-layout LLaVA folder (e.g. liuhaotian/llava-v1.5-7b)."""
    vision_tower: str | None = None
    """CLIP folder (e.g. openai/clip-vit-large-patch14-336), with --llava."""
    llava_lora: str | None = None
    """LoRA run folder of the original LLaVA repo."""
    base: str | None = None
    """With --llava-lora: the converted llava-hf base folder."""
    overwrite: bool = False
    """Replace an existing output folder."""


@dataclass
class LineSettings:
    """What the station's line view, drift alarms and audit sample read: one group embedded in the settings of
    serve and watch."""

    line: str | None = None
    """Line name recorded with every inspection, e.g. 'line 2'; unset: watch's hot-folder name, serve's source (page, api, chat)."""
    baseline: str | None = None
    """An `evaluate` report folder (or its results.json): the tuned model's p(NG) there is the drift reference; unset: the station's first baseline_n inspections under the model."""
    baseline_n: int = 500
    """The first this many inspections under a model are its station baseline (drift reference, NG rate)."""
    drift_window: int = 500
    """Each line's latest this many inspections under a model are compared with the model's baseline."""
    drift_psi_warn: float = 0.1
    """Population stability index of the window against the baseline at which drift is a warning."""
    drift_psi_alarm: float = 0.25
    """Population stability index at which drift is an alarm (page, /v1/station/health, log)."""
    drift_ng_sigma: float = 3.0
    """The window's NG rate is an alarm beyond the station baseline's NG rate ± this many binomial σ."""
    audit_rate: float = 0.02
    """Share of inspections drawn into the random audit sample, whose reviews measure escape and overkill."""
    audit_seed: int = 0
    """Which random audit sample (another seed draws another one)."""
    audit_escape_target: float = 0.01
    """Escape rate the audit should bound: the line view says how many reviews would show it (95% upper bound)."""
    audit_overkill_target: float = 0.05
    """Overkill rate the audit should bound (95% upper bound)."""
    shift_hours: list[int] = field(default_factory=lambda: [6, 14, 22])
    """Local hours at which shifts start, for the line view: 6,14,22 is A 06–14, B 14–22, C 22–06."""
    timezone: str | None = None
    """The plant's time zone for the line view's hours, shifts and days (e.g. Europe/Berlin); unset: this machine's."""


@dataclass
class PredictConfig(ModelSettings):
    """Score photos OK/NG (and describe them) with a base, tuned or merged model."""

    positional: ClassVar[str] = "paths"

    paths: list[str] = field(default_factory=list)
    """Images or folders (searched recursively)."""
    out: str = "predictions.jsonl"
    """Output file, .jsonl or .csv."""
    describe: bool = False
    """Also generate each photo's answer: its description, and the defects it boxes (in the photo's pixels)."""
    locate: bool = False
    """Also ask only for the defects' boxes (the run's locate question), for the `defects` column."""
    threshold: float = 0.5
    """p(NG) at or above which a photo is NG."""
    batch_size: int = 8
    """Images per forward pass."""
    question: str | None = None
    """Question asked; default is the first training question."""
    max_new_tokens: int = 128
    """Longest generated answer, in tokens (a box takes ~25)."""
    overwrite: bool = False
    """Replace an existing output file."""


@dataclass
class EvaluateConfig(ModelSettings):
    """Compare base and tuned models on labelled photos; write results.json and report.html."""

    base: str | None = None
    """Base model folder, when model is a merged folder."""
    data: str = ""
    """Dataset folder from prepare (its val.json) or a labelled class-folder tree."""
    out: str = ""
    """Report folder: results.json, report.html."""
    questions: str | None = None
    """Text file, one question per line, asked besides the training questions."""
    max_escape: float = 0.0
    """Highest escape rate (NG passed as OK) allowed when picking a threshold."""
    threshold: float = 0.5
    """p(NG) at or above which a photo is NG in the main table."""
    batch_size: int = 8
    """Images per forward pass."""
    max_new_tokens: int = 128
    """Longest generated answer (the gallery's descriptions, the located boxes), in tokens."""
    locate: bool = True
    """Ask each model for the defects' boxes on every NG photo with a true box and every OK photo, and measure how well they point at the defects (one generation per photo and model)."""
    gallery_size: int = 48
    """Most images shown with answers in the report."""
    compare: list[str] = field(default_factory=list)
    """More tuned models scored on the same photos and shown side by side, each MODEL or MODEL,ADAPTER (e.g. a Qwen2.5-VL run beside a LLaVA-1.5 one)."""
    overwrite: bool = False
    """Replace an existing report folder."""


@dataclass
class ServeConfig(LineSettings, ModelSettings):
    """Serve the model: REST inspection, OpenAI-compatible chat, operator web page."""

    host: str = "127.0.0.1"
    """Address to bind; only this machine can connect unless changed."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """When set, every API route needs `Authorization: Bearer KEY` (`ps` shows it: prefer api_key_file)."""
    threshold: float = 0.5
    """p(NG) at or above which a photo is NG."""
    max_batch: int = 8
    """Most requests gathered into one forward pass."""
    max_queue: int = 64
    """Requests waiting beyond this get 503 with Retry-After."""
    max_upload_mb: float = 20.0
    """Largest accepted upload."""
    request_timeout_s: float = 120.0
    """A request waiting longer than this fails with 504."""
    max_new_tokens: int = 128
    """Longest description, in tokens."""
    station: str | None = None
    """Station folder: record every inspection (photo, verdict, model) there; adds history and review to the page."""
    db: str | None = None
    """Database URL for the station record instead of DIR/station.db, e.g. postgresql+psycopg://user@host/db."""
    api_key_file: str | None = None
    """File holding the API key (safer than api_key, which `ps` shows; or set VLM_INSPECT_API_KEY)."""
    max_prompt_chars: int = 4000
    """Most characters of text in one chat conversation; longer ones get 413."""
    body_timeout_s: float = 30.0
    """Most seconds a client may take to send a request body; slower ones get 408 and are disconnected."""


@dataclass
class DemoConfig:
    """The whole job on CPU in minutes: synthetic boxes, tiny model, training, report."""

    out: str = "vlm-inspect-demo"
    """Folder for the demo's model, data, run and report."""
    fast: bool = False
    """Smaller sizes for CI; same code path."""
    seed: int = 0
    """Seed for images, model and training."""
    reference: bool = False
    """Show a known-good box from the same station before every photo, in training and evaluation (the report then
    puts the tuned model with and without it side by side)."""
    overwrite: bool = False
    """Replace an existing demo folder."""


@dataclass
class WatchConfig(LineSettings, ModelSettings):
    """Inspect each new photo in a hot folder once, record it, and sort or answer it."""

    positional: ClassVar[str] = "folder"

    folder: str = ""
    """Hot folder a line camera writes photos into; new photos are inspected once each."""
    station: str = ""
    """Station folder where every verdict is recorded (the ledger of photos already inspected)."""
    db: str | None = None
    """Database URL for the station record instead of DIR/station.db."""
    sort: Literal["none", "move", "result-file"] = "none"
    """After inspection: none; move into ok/ and ng/ subfolders; or write <photo>.result.json beside it."""
    threshold: float = 0.5
    """p(NG) at or above which a photo is NG."""
    describe: bool = False
    """Also describe each NG photo and record the defects its answer boxes (slower)."""
    locate: bool = False
    """Also ask each NG photo for its defects' boxes alone (recorded, and in the result file)."""
    poll_s: float = 1.0
    """Seconds between looks at the folder; a file is read once its size and time stay the same for one poll."""
    once: bool = False
    """Inspect what is in the folder now (after one settling poll), then exit."""
    max_polls: int | None = None
    """Stop after this many polls (unset: run until interrupted)."""
    batch_size: int = 8
    """Photos per forward pass."""
    metrics_port: int | None = None
    """Serve Prometheus metrics (inspections, verdicts, latency, drift) at http://metrics_host:PORT/metrics."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint; only this machine can scrape it unless changed."""


@dataclass
class ExportConfig:
    """Write the station's reviewed photos as ok/ and ng/<type>/ folders with sidecars for prepare."""

    station: str = ""
    """Station folder to export the reviewed records of."""
    db: str | None = None
    """Database URL of the station record instead of DIR/station.db."""
    out: str = ""
    """Folder to write: ok/, ng/<defect type>/ with <stem>.json sidecars, ready for `vlm-inspect prepare`."""
    overwrite: bool = False
    """Replace an existing non-empty output folder."""


@dataclass
class LabelConfig:
    """Sort a fresh photo folder into OK / NG and box the defects on the station page (no model needed)."""

    positional: ClassVar[str] = "photos"

    photos: str = ""
    """Folder of photos to sort into OK / NG and box (searched recursively)."""
    station: str = ""
    """Station folder the labels are recorded in (export them with `vlm-inspect export`)."""
    db: str | None = None
    """Database URL of the station record instead of DIR/station.db."""
    host: str = "127.0.0.1"
    """Address to bind; only this machine can connect unless changed."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """When set, every route but the page needs `Authorization: Bearer KEY`."""


@dataclass
class PruneConfig:
    """Retention: delete old unreviewed records by age or photo-folder size; reviewed ones always stay."""

    station: str = ""
    """Station folder to prune."""
    db: str | None = None
    """Database URL of the station record instead of DIR/station.db."""
    max_age_days: float | None = None
    """Delete unreviewed inspections older than this many days."""
    max_gb: float | None = None
    """Then delete the oldest unreviewed inspections until the stored photos fit in this many GiB."""


@dataclass
class TinyModelConfig:
    """Build a tiny random model of a family (its processor, tokenizer and chat template) for tests and trials."""

    positional: ClassVar[str] = "out"

    out: str = ""
    """Folder to write the tiny model to."""
    seed: int = 0
    """Seed of the random weights."""
    family: str = "llava"
    """llava, qwen2_5_vl, qwen3_vl, internvl or gemma3: the family's layout and tokens."""


@dataclass
class EnvConfig:
    """Print versions of the stack, the devices seen, and which extras are installed."""


# ---------------------------------------------------------------- machinery


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and the settings groups it embeds: the string literal under each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, tp: Any, problems: list[str]) -> Any:
    """Convert a YAML or command-line value to the field's type, noting problems."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:  # `float | None`: the float's own problem says more than "is not a float"
            return _coerce(name, value, inner[0], problems)
        for a in inner:
            sub: list[str] = []
            out = _coerce(name, value, a, sub)
            if not sub:
                return out
        problems.append(f"{name}: {value!r} is not a {' or '.join(_type_name(a) for a in inner)}")
        return value
    if origin is Literal:
        if value not in args:
            problems.append(f"{name}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            problems.append(f"{name}: {value!r} is not a list")
            return value
        return [_coerce(name, v, args[0], problems) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        problems.append(f"{name}: {value!r} is not true or false")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            problems.append(f"{name}: {value!r} is not a number")
            return value
        try:
            number = tp(value) if tp is float else int(str(value).replace("_", ""))
        except (TypeError, ValueError):
            problems.append(f"{name}: {value!r} is not {'an integer' if tp is int else 'a number'}")
            return value
        if tp is float and not math.isfinite(number):  # every range check below would pass NaN, and inf overflows
            problems.append(f"{name}: {value!r} is not a finite number")
            return value
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            problems.append(f"{name}: {value!r} is not text")
            return value
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["lr=1e-4", "augment=false"]` → `{"lr": "1e-4", "augment": "false"}`."""
    out, bad = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            bad.append(f"{item!r} is not key=value")
            continue
        out[key.strip().replace("-", "_")] = value
    if bad:
        raise ConfigError(bad)
    return out


def build_config(
    cls: type[C],
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    **explicit: Any,
) -> C:
    """Settings from (lowest first) defaults, a YAML file, key=value overrides, explicit values.

    Explicit values that are None are ignored, so CLI options left unset keep lower layers.
    Raises ConfigError listing every unknown key and bad value at once.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError([f"{path}: no such config file"]) from None
        except yaml.YAMLError as err:
            raise ConfigError([f"{path}: not valid YAML ({err})"]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: expected a mapping of settings, got {type(loaded).__name__}"])
        values.update(loaded)
    values.update(parse_overrides(overrides or []))
    values.update({k: v for k, v in explicit.items() if v is not None})
    return make_config(cls, values, problems)


def make_config(cls: type[C], values: dict[str, Any], problems: list[str] | None = None) -> C:
    """Build and type-check a config from a mapping; raise one ConfigError for all problems."""
    problems = list(problems or [])
    types_ = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            problems.append(f"{key}: unknown setting (known: {', '.join(sorted(names))})")
            continue
        kwargs[key] = _coerce(key, value, types_[key], problems)
    if problems:
        raise ConfigError(problems)
    return cls(**kwargs)


def require(cfg: Any, *names: str) -> list[str]:
    """Problems for required path-like settings left empty."""
    return [f"{n}: required" for n in names if not getattr(cfg, n)]


def save_config(cfg: Any, folder: str | Path, name: str = RESOLVED_CONFIG_NAME) -> Path:
    """Write the resolved settings as YAML beside an output, so folders describe themselves."""
    path = Path(folder) / name
    data = {"kind": type(cfg).__name__, **dataclasses.asdict(cfg)}
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def load_saved_config(cls: type[C], path: str | Path) -> C:
    """Read a config written by save_config."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    data.pop("kind", None)
    return make_config(cls, data)

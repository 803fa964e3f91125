"""Convert checkpoints of the original LLaVA repo (liuhaotian/...) to what the toolkit loads.

- `--llava ORIG --vision-tower CLIP --out HF`: an original-layout model (`LlavaLlamaForCausalLM`,
  `mm_*` config keys, `model.mm_projector.{0,2}`) plus its CLIP folder become one llava-hf folder,
  the layout of `llava-hf/llava-1.5-7b-hf`: keys renamed, `<image>` and `<pad>` added, embeddings
  grown to a multiple of 64, CLIP image processing, the LLaVA-1.5 chat template.
- `--llava-lora RUN --base HF --out ADAPTER`: a LoRA run of the original repo (`adapter_model.*`
  with original module names, `non_lora_trainables.bin` holding the trained projector) becomes a
  PEFT adapter for our `LlavaForConditionalGeneration`, the form `vlm-inspect train` writes.

Every source tensor must be used and every expected tensor found; the few dropped on purpose
(rotary `inv_freq` caches, CLIP's text tower and heads, `position_ids`) are listed below.
Outputs are written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from peft import LoraConfig
from rich.console import Console
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from vlm_inspect.config import ConvertConfig, require, save_config
from vlm_inspect.errors import ConfigError, ModelFolderError
from vlm_inspect.folders import ModelFolder
from vlm_inspect.models.families.common import IMAGE_TOKEN, PAD_TOKEN
from vlm_inspect.models.families.llava import LLAVA_CHAT_TEMPLATE
from vlm_inspect.models.load import SHARD_SIZE
from vlm_inspect.outputs import staged_output

# New embedding rows are drawn from N(mean, NEW_ROW_VARIANCE * covariance) of the existing rows,
# as transformers' resize does, so new tokens start as "average" tokens instead of random noise.
NEW_ROW_VARIANCE = 1e-5
NEW_ROW_SEED = 0
ROW_MULTIPLE = 64
LANGUAGE_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MAX_LISTED = 12
console = Console()

# Original key (after the `base_model.model.` PEFT prefix is gone) → transformers 5 in-memory key.
_LLAVA_RENAMES = [
    (re.compile(r"^model\.mm_projector\.0\."), "model.multi_modal_projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.2\."), "model.multi_modal_projector.linear_2."),
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"model.language_model.\1."),
    (re.compile(r"^lm_head\."), "lm_head."),
]
# Dropped on purpose: rotary caches are recomputed; a vision tower saved inside a merged original
# checkpoint is the frozen CLIP, taken from --vision-tower instead.
_LLAVA_DROPPED = re.compile(r"(\.rotary_emb\.inv_freq$)|(^model\.vision_tower\.)")
# CLIPModel parts that are not the vision tower, and buffers recomputed at load.
_CLIP_DROPPED = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)|position_ids$")
_EMBED = "model.language_model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"
# Keys of an original LLaVA config that are not Llama settings, or that our config sets itself.
_LLAMA_LEGACY_KEYS = ("rope_theta", "rope_scaling")


def convert(cfg: ConvertConfig) -> Path:
    """Convert an original LLaVA model (with --llava) or LoRA run (with --llava-lora).

    Args:
        cfg: which inputs to convert and where to write.

    Returns:
        The folder written.

    Raises:
        ConfigError: the combination of settings is not one of the two conversions.
        ModelFolderError: an input folder is missing files or its tensors do not match.
        OutputExistsError: `out` exists and `overwrite` is off.
    """
    _check_settings(cfg)
    if cfg.llava:
        return convert_llava(Path(cfg.llava), Path(cfg.vision_tower or ""), Path(cfg.out), cfg)
    return convert_llava_lora(Path(cfg.llava_lora or ""), Path(cfg.base or ""), Path(cfg.out), cfg)


def _check_settings(cfg: ConvertConfig) -> None:
    problems = require(cfg, "out")
    if cfg.llava and cfg.llava_lora:
        problems.append("llava, llava_lora: give one (an original model, or an original LoRA run), not both")
    if not cfg.llava and not cfg.llava_lora:
        problems.append("llava or llava_lora: required (an original model folder, or an original LoRA run folder)")
    if cfg.llava and not cfg.vision_tower:
        problems.append("vision_tower: required with llava (the CLIP folder, e.g. clip-vit-large-patch14-336)")
    if cfg.llava_lora and not cfg.base:
        problems.append("base: required with llava_lora (the converted llava-hf base folder)")
    if cfg.vision_tower and not cfg.llava:
        problems.append("vision_tower: only used with llava")
    if cfg.base and not cfg.llava_lora:
        problems.append("base: only used with llava_lora")
    inputs = [p for p in (cfg.llava, cfg.vision_tower, cfg.llava_lora, cfg.base) if p]
    if cfg.out and any(Path(cfg.out).resolve() == Path(p).resolve() for p in inputs):
        problems.append(f"out: {cfg.out} is also an input; write the result to a new folder")
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------ output folders


# ------------------------------------------------------------------ reading tensors


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: from its index JSON, else its model/pytorch_model files.

    Safetensors win over `.bin` when both are present. Side files such as the original repo's
    `mm_projector.bin` (a copy of the projector already in the shards) are not weights of the model.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFolderError(f"{index}: no weight_map")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ModelFolderError(f"{index}: lists shard files that are missing: {', '.join(missing)}")
            return files
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise ModelFolderError(f"{folder}: no weights (model*.safetensors or pytorch_model*.bin)")


def read_tensors(files: Iterable[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of `files` and the file each came from; a key in two files is an error."""
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    for path in files:
        for key, tensor in read_tensor_file(path).items():
            if key in source:
                raise ModelFolderError(f"{path}: tensor {key} is also in {source[key].name}")
            tensors[key], source[key] = tensor, path
    return tensors, source


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file or torch pickle (tensors only: `weights_only` refuses code)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise ModelFolderError(f"{path}: cannot read the tensors (truncated or corrupted?): {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelFolderError(f"{path}: expected a mapping of tensor names to tensors")
    return data


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ModelFolderError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return data


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in shown) + more


def _raise_mismatch(what: str, sections: dict[str, list[str]]) -> None:
    """One ModelFolderError listing every missing, unknown and misshapen tensor."""
    parts = [_listing(title, items) for title, items in sections.items() if items]
    if parts:
        raise ModelFolderError("\n".join([f"{what}: the tensors do not match what was expected", *parts]))


# ------------------------------------------------------------------ original model → llava-hf


def convert_llava(llava_dir: Path, clip_dir: Path, out: Path, cfg: ConvertConfig) -> Path:
    """Write the llava-hf layout of an original-layout LLaVA folder and its CLIP vision tower.

    Args:
        llava_dir: original-layout folder (config.json with `mm_*` keys, weights, tokenizer).
        clip_dir: CLIP folder (`CLIPModel` or `CLIPVisionModel` config and weights).
        out: folder to write.
        cfg: the settings, saved beside the output as config.yaml.

    Returns:
        `out`.
    """
    original = _original_config(llava_dir)
    vision = _clip_vision_config(clip_dir, original)
    tokenizer = _load_tokenizer(llava_dir)
    n_original_tokens = len(tokenizer)
    image_id, pad_id = _add_llava_tokens(tokenizer)
    rows = math.ceil(len(tokenizer) / ROW_MULTIPLE) * ROW_MULTIPLE
    config = _llava_config(original, vision, rows, image_id, pad_id)
    with staged_output(
        out, cfg.overwrite, "ConvertConfig", (cfg.llava, cfg.vision_tower, cfg.llava_lora, cfg.base)
    ) as tmp:
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        state, dropped = _converted_state(llava_dir, clip_dir, model, n_original_tokens)
        dtype = state[_EMBED].dtype
        state = {k: v.to(dtype) for k, v in state.items()}
        state[_EMBED] = grow_rows(state[_EMBED], rows)
        state[_LM_HEAD] = grow_rows(state[_LM_HEAD], rows)
        model.load_state_dict(state, strict=True, assign=True)
        model.config.dtype = dtype
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = pad_id
        model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        _llava_processor(tokenizer, vision).save_pretrained(tmp)
        save_config(cfg, tmp)
    _print_model_summary(llava_dir, clip_dir, out, config, n_original_tokens, dropped, dtype)
    return out


def _original_config(llava_dir: Path) -> dict:
    if not llava_dir.is_dir():
        raise ModelFolderError(f"{llava_dir}: no such folder")
    path = llava_dir / "config.json"
    config = _read_json(path)
    if config.get("model_type") == "llava" and "text_config" in config:
        raise ModelFolderError(f"{llava_dir}: already in the llava-hf layout; use it as --model directly")
    if not any(k.startswith("mm_") for k in config):
        raise ModelFolderError(f"{path}: no mm_* keys; not an original-layout LLaVA (LlavaLlamaForCausalLM) folder")
    problems = []
    if config.get("mm_projector_type", "linear") != "mlp2x_gelu":
        problems.append(f"mm_projector_type is {config.get('mm_projector_type')!r}; only 'mlp2x_gelu' (LLaVA-1.5)")
    if config.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        problems.append(f"mm_vision_select_feature {config['mm_vision_select_feature']!r} is not patch or cls_patch")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        problems.append("mm_use_im_start_end / mm_use_im_patch_token are set; LLaVA-1.5 layouts use neither")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        problems.append(f"mm_patch_merge_type {config['mm_patch_merge_type']!r} (LLaVA-NeXT) is not LLaVA-1.5")
    if problems:
        raise ModelFolderError(f"{path}: cannot convert this model:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def _clip_vision_config(clip_dir: Path, original: dict) -> CLIPVisionConfig:
    if not clip_dir.is_dir():
        raise ModelFolderError(f"{clip_dir}: no such CLIP folder")
    path = clip_dir / "config.json"
    model_type = _read_json(path).get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise ModelFolderError(
            f"{path}: model_type is {model_type!r}, expected a CLIP folder (e.g. openai/clip-vit-large-patch14-336)"
        )
    vision = CLIPVisionConfig.from_pretrained(clip_dir)
    expected = original.get("mm_hidden_size")
    if expected is not None and vision.hidden_size != expected:
        raise ModelFolderError(
            f"{path}: the vision hidden size is {vision.hidden_size} but {original.get('mm_vision_tower', 'the model')} "
            f"expects mm_hidden_size {expected}; is this the CLIP model the LLaVA was trained with?"
        )
    return vision


def _load_tokenizer(llava_dir: Path) -> PreTrainedTokenizerBase:
    try:
        # transformers does not know model_type llava_llama; the tokenizer is Llama's.
        return AutoTokenizer.from_pretrained(llava_dir, config=LlamaConfig())
    except (OSError, ValueError, ImportError, TypeError) as err:
        raise ModelFolderError(
            f"{llava_dir}: cannot load the tokenizer ({err}); a tokenizer.model needs `pip install sentencepiece`"
        ) from None


def _add_llava_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Add `<image>` then `<pad>` after the vocabulary, in llava-hf's order; return their ids."""
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)


def _llava_config(original: dict, vision: CLIPVisionConfig, rows: int, image_id: int, pad_id: int) -> LlavaConfig:
    llama_keys = set(LlamaConfig.__annotations__) | set(_LLAMA_LEGACY_KEYS)
    text_values = {k: v for k, v in original.items() if k in llama_keys and v is not None}
    text = LlamaConfig.from_dict({**text_values, "vocab_size": rows, "pad_token_id": pad_id})
    strategy = "full" if original.get("mm_vision_select_feature") == "cls_patch" else "default"
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.pad_token_id = pad_id
    return config


def _converted_state(
    llava_dir: Path, clip_dir: Path, model: LlavaForConditionalGeneration, n_tokens: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original and CLIP tensors under the model's names, checked against its shapes.

    Returns the tensors and the names dropped on purpose. Raises ModelFolderError listing every
    missing, unknown or misshapen tensor with its file.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Embedding rows are checked against the original tokenizer; they grow afterwards.
    for key in (_EMBED, _LM_HEAD):
        expected[key] = (n_tokens, *expected[key][1:])
    vision_prefix = (
        "model.vision_tower.vision_model."
        if any(k.startswith("model.vision_tower.vision_model.") for k in expected)
        else "model.vision_tower."
    )
    llava, llava_src = read_tensors(weight_files(llava_dir))
    clip, clip_src = read_tensors(weight_files(clip_dir))
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown, dropped = [], []
    for key, tensor in llava.items():
        new = _llava_key(key)
        if _LLAVA_DROPPED.search(key):
            dropped.append(key)
        elif new is None:
            unknown.append(f"{key} (in {llava_src[key]})")
        else:
            state[new], origin[new] = tensor, f"{key} in {llava_src[key]}"
    for key, tensor in clip.items():
        if _CLIP_DROPPED.search(key):
            dropped.append(key)
            continue
        new = vision_prefix + key.removeprefix("vision_model.")
        state[new], origin[new] = tensor, f"{key} in {clip_src[key]}"
    unknown += [f"{origin.pop(k)}" for k in list(state) if k not in expected]
    state = {k: v for k, v in state.items() if k in expected}
    missing = [_expected_source(k, llava_dir, clip_dir) for k in expected if k not in state]
    shapes = [
        f"{origin[k]}: shape {list(v.shape)}, expected {list(expected[k])}"
        for k, v in state.items()
        if tuple(v.shape) != expected[k]
    ]
    _raise_mismatch(
        f"{llava_dir} + {clip_dir}",
        {"missing": missing, "not recognised": unknown, "wrong shape": shapes},
    )
    return state, dropped


def _llava_key(key: str) -> str | None:
    for pattern, replacement in _LLAVA_RENAMES:
        if pattern.search(key):
            return pattern.sub(replacement, key)
    return None


def _expected_source(key: str, llava_dir: Path, clip_dir: Path) -> str:
    """Name a missing tensor the way the user's files would."""
    if key.startswith("model.vision_tower."):
        return f"vision_model.{key.split('.', 2)[2].removeprefix('vision_model.')} (from {clip_dir})"
    original = (
        key.replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.")
        .replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")
        .replace("model.language_model.", "model.")
    )
    return f"{original} (from {llava_dir})"


def grow_rows(weight: torch.Tensor, rows: int, seed: int = NEW_ROW_SEED) -> torch.Tensor:
    """`weight` with rows added up to `rows`, drawn from N(mean, NEW_ROW_VARIANCE · covariance).

    Drawing as a random mix of the centred rows gives exactly that covariance without a
    Cholesky factor, which would fail for a singular covariance.
    """
    n, _ = weight.shape
    if rows <= n:
        return weight
    w = weight.float()
    centred = w - w.mean(0)
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(rows - n, n, generator=generator) * math.sqrt(NEW_ROW_VARIANCE / n)
    new = w.mean(0) + mix @ centred
    return torch.cat([weight, new.to(weight.dtype)])


def _llava_processor(tokenizer: PreTrainedTokenizerBase, vision: CLIPVisionConfig) -> LlavaProcessor:
    size = vision.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _print_model_summary(
    llava_dir: Path,
    clip_dir: Path,
    out: Path,
    config: LlavaConfig,
    n_tokens: int,
    dropped: list[str],
    dtype: torch.dtype,
) -> None:
    kinds = sorted({_dropped_kind(k) for k in dropped})
    console.print(f"[bold green]converted[/] {llava_dir} + {clip_dir} → {out} (llava-hf layout, {dtype})")
    console.print(
        f"  vocabulary {n_tokens} → {config.text_config.vocab_size} rows; "
        f"<image> = {config.image_token_index}, <pad> = {config.pad_token_id}; "
        f"images {config.vision_config.image_size} px, {config.image_seq_length} tokens each"
    )
    if dropped:
        console.print(f"  dropped on purpose: {len(dropped)} tensors ({', '.join(kinds)})")


def _dropped_kind(key: str) -> str:
    if key.endswith("inv_freq"):
        return "rotary caches"
    if key.endswith("position_ids"):
        return "position ids"
    if key.startswith("model.vision_tower."):
        return "vision tower copy in the LLaVA folder"
    return "CLIP text tower and heads"


# ------------------------------------------------------------------ original LoRA run → PEFT adapter


def convert_llava_lora(lora_dir: Path, base_dir: Path, out: Path, cfg: ConvertConfig) -> Path:
    """Write a PEFT adapter for our llava-hf base from a LoRA run folder of the original repo.

    LoRA tensors move from `model.layers.*` to `model.language_model.layers.*`; the projector
    trained beside them (`non_lora_trainables.bin`) is saved as `modules_to_save`, so
    `attach_adapter(base, out)` restores both.

    Args:
        lora_dir: original run folder (adapter_config.json, adapter_model.*, non_lora_trainables.bin).
        base_dir: the llava-hf base the adapter is for (converted with `convert --llava`).
        out: adapter folder to write.
        cfg: the settings, saved beside the output as config.yaml.

    Returns:
        `out`.
    """
    ModelFolder.open(base_dir)
    if not lora_dir.is_dir():
        raise ModelFolderError(f"{lora_dir}: no such LoRA run folder")
    settings = _original_lora_settings(lora_dir)
    weights_path = _adapter_weights_file(lora_dir)
    extra_path = lora_dir / "non_lora_trainables.bin"
    if not extra_path.exists():
        raise ModelFolderError(f"{extra_path}: missing (the projector trained with the LoRA is saved there)")
    lora, _ = read_tensors([weights_path])
    extra, _ = read_tensors([extra_path])
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(base_dir))
    modules = dict(model.named_modules())
    names = _target_names(settings, lora)
    tensors = _renamed_lora(lora, weights_path, modules, names, settings["r"])
    projector = _renamed_projector(extra, extra_path, model)
    lora_config = LoraConfig(
        r=settings["r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings.get("lora_dropout", 0.0),
        use_rslora=settings.get("use_rslora", False),
        target_modules=r".*language_model.*\.(" + "|".join(names) + ")",
        modules_to_save=["multi_modal_projector"] if projector else None,
        bias="none",
        base_model_name_or_path=str(base_dir),
    )
    with staged_output(
        out, cfg.overwrite, "ConvertConfig", (cfg.llava, cfg.vision_tower, cfg.llava_lora, cfg.base)
    ) as tmp:
        lora_config.save_pretrained(tmp)
        save_file({**tensors, **projector}, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        save_config(cfg, tmp)
    console.print(
        f"[bold green]converted[/] {lora_dir} → {out} (PEFT adapter for {base_dir}): "
        f"{len(tensors) // 2} LoRA layers ({', '.join(names)}), r={settings['r']}, alpha={settings['lora_alpha']}"
        + (", projector included" if projector else ", no projector (non_lora_trainables.bin was empty)")
    )
    return out


def _original_lora_settings(lora_dir: Path) -> dict:
    path = lora_dir / "adapter_config.json"
    if not path.exists():
        raise ModelFolderError(f"{lora_dir}: no adapter_config.json; is this a LoRA run folder of the original repo?")
    settings = _read_json(path)
    problems = []
    if settings.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {settings.get('peft_type')!r}, only LORA converts")
    for key in ("r", "lora_alpha"):
        if not isinstance(settings.get(key), int):
            problems.append(f"{key} missing or not a number")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if settings.get(key):
            problems.append(f"{key} is set; per-layer patterns are not supported")
    if settings.get("bias", "none") != "none":
        problems.append(f"bias is {settings['bias']!r}; only 'none' (the LLaVA default) converts")
    if settings.get("use_dora"):
        problems.append("use_dora is set; DoRA adapters are not supported")
    if problems:
        raise ModelFolderError(f"{path}: cannot convert this adapter:\n" + "\n".join(f"  - {p}" for p in problems))
    return settings


def _adapter_weights_file(lora_dir: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (lora_dir / name).exists():
            return lora_dir / name
    raise ModelFolderError(f"{lora_dir}: no adapter_model.safetensors or adapter_model.bin")


def _target_names(settings: dict, lora: dict[str, torch.Tensor]) -> list[str]:
    """Linear-layer names the LoRA targets, from adapter_config.json or (for a regex) the weights."""
    targets = settings.get("target_modules")
    if isinstance(targets, list):
        found = set(targets)
    else:
        found = {m.group(1) for k in lora if (m := re.search(r"\.(\w+)\.lora_[AB]\.", k))}
    return [n for n in LANGUAGE_LINEAR_NAMES if n in found] + sorted(found - set(LANGUAGE_LINEAR_NAMES))


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(.+)\.(lora_[AB])\.weight$")


def _renamed_lora(
    lora: dict[str, torch.Tensor], path: Path, modules: dict[str, torch.nn.Module], names: list[str], r: int
) -> dict[str, torch.Tensor]:
    """LoRA tensors under PEFT's saved names for our model; every targeted layer must be there."""
    out: dict[str, torch.Tensor] = {}
    unknown, shapes = [], []
    for key, tensor in lora.items():
        m = _LORA_KEY.match(key)
        module_name = f"model.language_model.layers.{m.group(1)}" if m else ""
        module = modules.get(module_name)
        if not m or not isinstance(module, torch.nn.Linear):
            unknown.append(f"{key} (in {path})")
            continue
        want = (r, module.in_features) if m.group(2) == "lora_A" else (module.out_features, r)
        if tuple(tensor.shape) != want:
            shapes.append(f"{key} (in {path}): shape {list(tensor.shape)}, expected {list(want)}")
        out[f"base_model.model.{module_name}.{m.group(2)}.weight"] = tensor.contiguous()
    targeted = [
        n
        for n, mod in modules.items()
        if isinstance(mod, torch.nn.Linear) and n.startswith("model.language_model.") and n.rsplit(".", 1)[1] in names
    ]
    missing = [
        f"base_model.model.model.layers.{n.removeprefix('model.language_model.layers.')}.{part}.weight"
        for n in targeted
        for part in ("lora_A", "lora_B")
        if f"base_model.model.{n}.{part}.weight" not in out
    ]
    _raise_mismatch(str(path), {"missing": missing, "not recognised": unknown, "wrong shape": shapes})
    return out


def _renamed_projector(
    extra: dict[str, torch.Tensor], path: Path, model: LlavaForConditionalGeneration
) -> dict[str, torch.Tensor]:
    """The trained projector under PEFT's modules_to_save names; nothing else may be in the file."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".multi_modal_projector." in k}
    out: dict[str, torch.Tensor] = {}
    unknown, shapes = [], []
    for key, tensor in extra.items():
        new = _llava_key(key.removeprefix("base_model.model."))
        if new not in expected:
            unknown.append(f"{key} (in {path}; only the mm_projector converts)")
            continue
        if tuple(tensor.shape) != expected[new]:
            shapes.append(f"{key} (in {path}): shape {list(tensor.shape)}, expected {list(expected[new])}")
        out[f"base_model.model.{new}"] = tensor.contiguous()
    # A partial projector would silently mix trained and base weights; none at all is a frozen projector.
    missing = [
        "base_model.model." + _expected_source(k, path, path).split(" (")[0]
        for k in expected
        if out and f"base_model.model.{k}" not in out
    ]
    _raise_mismatch(str(path), {"missing": missing, "not recognised": unknown, "wrong shape": shapes})
    return out

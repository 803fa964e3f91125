"""One reader for each folder the verbs hand each other: a model folder, a run folder, a dataset folder.

Each is checked once where it comes in (`ModelFolder.open`, `RunFolder(path)`, `DatasetFolder.open`) and then
passed down, so no verb re-derives what a folder holds. Every name inside a folder is defined here and
nowhere else. What a run learned from its dataset (language, product word, question wordings) is copied into
the run (`dataset.json`) and from there into a merged model (`train_dataset.json`), and so are its known-good
reference photos (`reference/` → the run's `reference/` → the merged model's `train_reference/`), so serving a
model never needs the training data on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlm_inspect.config import RESOLVED_CONFIG_NAME, TrainConfig, load_saved_config
from vlm_inspect.data.images import load_image, read_file_bytes
from vlm_inspect.data.llava_json import read_contained_llava_json
from vlm_inspect.data.prompts import load_prompts, with_reference
from vlm_inspect.data.reference import (
    Reference,
    ReferencePhoto,
    copy_reference_folder,
    read_reference_folder,
    write_reference_folder,
)
from vlm_inspect.data.reference_choice import FOLDER as REFERENCE_FOLDER
from vlm_inspect.errors import ConfigError, DataError, ModelFolderError
from vlm_inspect.models.families import all_families, family_of
from vlm_inspect.models.family import Family

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class DatasetFacts:
    """What a run keeps of the dataset it was trained on: the words its answers use and the questions it was
    asked. Later verbs read these from the run or merged model, never from the dataset."""

    language: str | None = None
    """`en` or `zh`; None where nothing says (then English)."""
    product: str | None = None
    verdict_questions: tuple[str, ...] = ()
    heldout_questions: tuple[str, ...] = ()
    locate_questions: tuple[str, ...] = ()
    reference_intro: tuple[str, ...] = ()
    """With references: the sentences (one, many with `{n}`) the first question started with; () where none."""

    def or_else(self, other: DatasetFacts) -> DatasetFacts:
        """These facts, each one left unknown here taken from `other`."""
        return DatasetFacts(**{name: getattr(self, name) or getattr(other, name) for name in self.__dataclass_fields__})

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> DatasetFacts:
        prompts = manifest.get("prompts") or {}
        return cls(
            language=manifest.get("language"),
            product=manifest.get("product"),
            verdict_questions=tuple(prompts.get("verdict_questions") or ()),
            heldout_questions=tuple(prompts.get("heldout_questions") or ()),
            locate_questions=tuple(prompts.get("locate_questions") or ()),
            reference_intro=_intros(prompts.get("reference_intro")),
        )

    def default_question(self) -> str:
        """What a tuned model was taught to answer first: the dataset's first verdict wording, else the shipped one."""
        if self.verdict_questions:
            return self.verdict_questions[0]
        return load_prompts(self.language or "en").default_question(self.product)

    def locate_wordings(self) -> tuple[str, ...]:
        """The wordings that ask for boxes alone (the first is what predict and serve ask), the product filled in."""
        if self.locate_questions:
            return self.locate_questions
        prompts = load_prompts(self.language or "en")
        return tuple(q.format(product=self.product or prompts.default_product) for q in prompts.locate_questions)

    def reference_question(self, question: str, references: int) -> str:
        """`question` as asked with `references` known-good photos first: after the sentence that says so, in the
        run's wording (the shipped one where the run has none); the question alone without references."""
        if not references:
            return question
        intros = self.reference_intro
        if len(intros) != 2 or not all(intros):
            prompts = load_prompts(self.language or "en")
            intros = tuple(prompts.reference_intros(self.product or prompts.default_product).values())
        return with_reference(question, intros, references, self.language)

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Path) -> DatasetFacts | None:
        """The facts in `path`, None when there is no such file; a ModelFolderError naming a broken one."""
        if not path.is_file():
            return None
        data = _read_json(path, ModelFolderError)
        if not isinstance(data, dict):
            raise ModelFolderError(f"{path}: expected an object of dataset facts")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("verdict_questions", "heldout_questions", "locate_questions", "reference_intro"):
            known[key] = tuple(known.get(key) or ())
        return cls(**known)


# ---------------------------------------------------------------- model folders


@dataclass(frozen=True)
class ModelFolder:
    """A checked model folder of a supported family: its config.json, family and the files beside them."""

    path: Path
    config: dict[str, Any] = field(repr=False)
    family: Family = field(repr=False)

    TRAIN_CONFIG = "train_config.yaml"
    """In a merged model: the settings of the run it was merged from (that run's config.yaml)."""
    TRAIN_DATASET = "train_dataset.json"
    """In a merged model: the run's dataset facts (that run's dataset.json)."""
    TRAIN_REFERENCE = "train_reference"
    """In a merged model: the run's known-good reference photos (that run's reference/)."""

    @classmethod
    def open(cls, path: str | Path | ModelFolder) -> ModelFolder:
        """Check the folder once: weights, tokenizer, processor and a config.json of a known family.

        Raises:
            ModelFolderError: naming what is missing, or saying which layout the folder is in.
        """
        if isinstance(path, ModelFolder):
            return path
        folder = Path(path)
        if not folder.exists():
            raise ModelFolderError(f"{folder}: no such model folder")
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: is a file, expected a model folder")
        if not (folder / "config.json").exists():
            if (folder / "adapter_config.json").exists():
                raise ModelFolderError(
                    f"{folder}: holds an adapter, not a model; pass it as --adapter and the base model as --model"
                )
            raise ModelFolderError(f"{folder}: missing config.json; is this a model folder?")
        config = _read_json(folder / "config.json", ModelFolderError)
        if not isinstance(config, dict):
            raise ModelFolderError(f"{folder / 'config.json'}: expected a JSON object")
        for family in all_families():
            hint = family.foreign_layout(config) if family.foreign_layout else None
            if hint:
                raise ModelFolderError(f"{folder}: {hint.format(folder=folder)}")
        family = family_of(config.get("model_type"), folder / "config.json")
        missing = _missing_files(folder)
        if missing:
            raise ModelFolderError(f"{folder}: missing {', '.join(missing)}")
        return cls(folder, config, family)

    @property
    def name(self) -> str:
        return self.path.name

    def trained(self) -> TrainConfig | None:
        """The run's settings when this is a merged model, else None."""
        return _saved_train_config(self.path / self.TRAIN_CONFIG)

    def facts(self) -> DatasetFacts | None:
        """The run's dataset facts when this is a merged model, else None."""
        return DatasetFacts.read(self.path / self.TRAIN_DATASET)

    def reference(self) -> Reference:
        """The run's reference photos when this is a model merged from a run that had them, else none."""
        return _reference_in(self.path / self.TRAIN_REFERENCE, ModelFolderError)

    def copy_side_files(self, folder: Path) -> list[Path]:
        """Copy into `folder` (a model folder being written) each file of this one that saving the model and
        processor did not write: a video processor's config (which a processor loaded without torchvision does
        not save, but plain `AutoProcessor` and vLLM need), the license, the README. Weights and the files that
        describe a run are never copied."""
        copied = []
        for path in sorted(self.path.iterdir()):
            target = folder / path.name
            ours = path.name.startswith(".") or path.name in (
                RESOLVED_CONFIG_NAME,
                self.TRAIN_CONFIG,
                self.TRAIN_DATASET,
            )
            if (
                path.is_file()
                and not path.is_symlink()
                and not ours
                and not _is_weights(path.name)
                and not target.exists()
            ):
                shutil.copyfile(path, target)
                copied.append(target)
        return copied


def _is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in ("training_args.bin",)


def _missing_files(folder: Path) -> list[str]:
    missing = []
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("weights (*.safetensors)")
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json or tokenizer.model)")
    if not any((folder / f).exists() for f in PROCESSOR_FILES):
        missing.append("image processor (processor_config.json or preprocessor_config.json)")
    return missing


# ---------------------------------------------------------------- run folders


@dataclass(frozen=True)
class RunFolder:
    """A training run: `config.yaml` (its settings), `dataset.json`, `metrics.jsonl`, `checkpoints/`, and at
    the end `adapter/` (LoRA, QLoRA) or `model/` (full fine-tuning)."""

    path: Path

    CONFIG = RESOLVED_CONFIG_NAME
    DATASET = "dataset.json"
    METRICS = "metrics.jsonl"
    ADAPTER = "adapter"
    FULL_MODEL = "model"
    REFERENCE = "reference"
    """The known-good photos the run's conversations showed first (a copy of its dataset's), with their index."""
    CHECKPOINTS = "checkpoints"
    COMPLETE = "checkpoint-complete"
    """Written into a checkpoint folder once it is whole; only marked checkpoints are resumed from."""

    @classmethod
    def named_by(cls, adapter: str | Path) -> RunFolder:
        """The run folder an `--adapter` value names: the folder itself, or the one above its `adapter/`."""
        path = Path(adapter)
        return cls(path.parent if path.name == cls.ADAPTER else path)

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def dataset_path(self) -> Path:
        return self.path / self.DATASET

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoints_path(self) -> Path:
        return self.path / self.CHECKPOINTS

    def output(self, method: str) -> Path:
        """Where the finished run's weights go: `model/` for full fine-tuning, `adapter/` otherwise."""
        return self.path / (self.FULL_MODEL if method == "full" else self.ADAPTER)

    def is_finished(self) -> bool:
        return (self.path / self.ADAPTER).exists() or (self.path / self.FULL_MODEL).exists()

    def config(self) -> TrainConfig:
        """The settings the run started with.

        Raises:
            ConfigError: config.yaml is missing or holds settings that do not read as a run's (each problem
                named with the file).
        """
        found = _saved_train_config(self.config_path)
        if found is None:
            raise ConfigError([f"{self.config_path}: missing; {self.path} is not a run folder"])
        return found

    def facts(self) -> DatasetFacts | None:
        return DatasetFacts.read(self.dataset_path)

    @property
    def reference_path(self) -> Path:
        return self.path / self.REFERENCE

    def reference(self) -> Reference:
        """The known-good photos the run was trained to compare against (none for a run without)."""
        return _reference_in(self.reference_path, ModelFolderError)

    def keep_reference(self, data: DatasetFolder) -> bool:
        """Copy the dataset's reference photos into the run, so the run holds what its conversations showed;
        False for a dataset without references."""
        if copy_reference_folder(data.path / REFERENCE_FOLDER, self.reference_path):
            return True
        files = data.sample_references()
        if not files:
            return False
        write_reference_folder(
            self.reference_path, [(data.image_root / f, _photo_entry(data.image_root / f)) for f in files]
        )
        return True

    def describe_model(self, folder: Path) -> None:
        """Copy the run's settings, dataset facts and reference photos into a model folder made from it (a merge,
        or the run's own `model/`), so every verb that later loads that folder alone knows how the run saw photos
        and spoke, and what it compares against."""
        shutil.copyfile(self.config_path, folder / ModelFolder.TRAIN_CONFIG)
        if self.dataset_path.is_file():
            shutil.copyfile(self.dataset_path, folder / ModelFolder.TRAIN_DATASET)
        copy_reference_folder(self.reference_path, folder / ModelFolder.TRAIN_REFERENCE)

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint folders, oldest first."""
        found = [p for p in self.checkpoints_path.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0]
        return sorted(found, key=checkpoint_step)

    def complete_checkpoints(self) -> list[Path]:
        return [p for p in self.checkpoints() if (p / self.COMPLETE).is_file()]

    def latest_complete_checkpoint(self) -> Path | None:
        """The newest checkpoint whose marker says it was fully written."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None


def checkpoint_step(folder: Path) -> int:
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def open_adapter(path: str | Path) -> tuple[Path, RunFolder | None]:
    """The PEFT folder `path` names (itself, or `path/adapter` for a run folder) and the run it came from.

    Raises:
        ModelFolderError: no adapter there, or a run that has not finished.
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"{folder}: no such adapter or run folder")
    for candidate in (folder, folder / RunFolder.ADAPTER):
        if (candidate / "adapter_config.json").exists():
            if not any(candidate.glob("adapter_model.*")):
                raise ModelFolderError(f"{candidate}: has adapter_config.json but no adapter_model.safetensors")
            return candidate, _run_of(candidate)
    if (folder / RunFolder.CHECKPOINTS).is_dir():
        raise ModelFolderError(
            f"{folder}: this run has no adapter/ yet (unfinished?); `vlm-inspect train --resume` finishes it"
        )
    raise ModelFolderError(f"{folder}: no adapter_config.json here or in {folder / RunFolder.ADAPTER}")


def _run_of(adapter_dir: Path) -> RunFolder | None:
    """The run an adapter folder is the `adapter/` of, when the folder above holds a run's config.yaml."""
    run = RunFolder.named_by(adapter_dir)
    if run.path == adapter_dir or not run.config_path.is_file():
        return None
    try:
        run.config()
    except ConfigError:
        return None  # a config.yaml of something else, not a run's
    return run


def _saved_train_config(path: Path) -> TrainConfig | None:
    if not path.is_file():
        return None
    try:
        return load_saved_config(TrainConfig, path)
    except ConfigError as err:
        raise ConfigError([f"{path}: {problem}" for problem in err.problems]) from None


# ---------------------------------------------------------------- dataset folders


@dataclass(frozen=True)
class DatasetFolder:
    """A dataset from `vlm-inspect prepare` (train.json, val.json, images/, manifest.json, config.yaml), or a
    LLaVA JSON file whose images are relative to its folder."""

    path: Path
    train_json: Path
    image_root: Path

    TRAIN = "train.json"
    VAL = "val.json"
    MANIFEST = "manifest.json"
    IMAGES = "images"

    @classmethod
    def open(cls, path: str | Path) -> DatasetFolder:
        """Raises DataError naming the folder when it is not a (finished) dataset or a LLaVA JSON file."""
        path = Path(path)
        if path.is_dir():
            if not (path / cls.TRAIN).exists():
                raise DataError(f"{path}: no {cls.TRAIN}; make a dataset with `vlm-inspect prepare`")
            if (path / cls.IMAGES).is_dir() and not (path / cls.MANIFEST).exists():
                raise DataError(f"{path}: no {cls.MANIFEST}, so `prepare` did not finish; run it again")
            return cls(path, path / cls.TRAIN, path)
        if path.suffix == ".json" and path.is_file():
            return cls(path, path, path.parent)
        raise DataError(f"{path}: no such dataset folder or LLaVA JSON file")

    @property
    def val_json(self) -> Path | None:
        val = self.path / self.VAL
        return val if self.path.is_dir() and val.is_file() else None

    def manifest(self) -> dict[str, Any]:
        """The prepare manifest; {} for a bare LLaVA JSON file (nothing beside it is read)."""
        path = self.path / self.MANIFEST
        if not self.path.is_dir() or not path.is_file():
            return {}
        manifest = _read_json(path, DataError)
        return manifest if isinstance(manifest, dict) else {}

    def facts(self) -> DatasetFacts:
        return DatasetFacts.from_manifest(self.manifest())

    def sample_references(self) -> list[str]:
        """The reference photos (paths relative to the image root) the first training sample shows first: for a
        LLaVA JSON made by hand, whose references have no folder and index of their own."""
        return list(self.samples()[0].get("reference") or [])

    def samples(self, split: str = "train") -> list[dict[str, Any]]:
        """The checked samples of train.json (or val.json); images must lie inside the dataset."""
        path = self.train_json if split == "train" else self.val_json
        if path is None:
            raise DataError(f"{self.path}: no {self.VAL}")
        samples = read_contained_llava_json(path, self.image_root)
        if not samples:
            raise DataError(f"{path}: no samples")
        return samples


def _intros(intro: Any) -> tuple[str, ...]:
    """(one, many) of a manifest's `reference_intro`; () when it has none."""
    if not isinstance(intro, dict) or not all(isinstance(intro.get(k), str) for k in ("one", "many")):
        return ()
    return (intro["one"], intro["many"])


def _reference_in(folder: Path, error: type[Exception]) -> Reference:
    try:
        return read_reference_folder(folder)
    except DataError as err:
        raise error(str(err)) from None


def _photo_entry(path: Path) -> ReferencePhoto:
    data = read_file_bytes(path)
    image = load_image(data, name=path.name)
    digest = hashlib.sha256(data).hexdigest()
    return ReferencePhoto(path.name, path.name, digest, image.width, image.height)


def _read_json(path: Path, error: type[Exception]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot be read ({err})") from None

"""Known-good references (#26): prepare writes them (a reference/ folder, chosen from ok/, or none as before), training
items show them first and supervise only the answers, augmentation moves photo and reference alike, the memory plan
counts their tokens, and the run's references travel into a merged
model, where the predictor uses them by default and says which."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import make_run
from vlm_inspect.cli import app
from vlm_inspect.config import ModelSettings, PrepareConfig
from vlm_inspect.data.dataset import ConversationDataset, augment_with_references
from vlm_inspect.data.llava_json import read_contained_llava_json, read_llava_json
from vlm_inspect.data.prompts import load_prompts
from vlm_inspect.data.reference import MAX_REFERENCES, NO_REFERENCE, Reference, read_reference_folder
from vlm_inspect.errors import ConfigError, DataError
from vlm_inspect.folders import DatasetFolder
from vlm_inspect.models.chat import conversation
from vlm_inspect.models.families import all_families, family_named
from vlm_inspect.models.load import load_processor
from vlm_inspect.prepare import prepare

FAMILIES = [f.name for f in all_families()]
runner = CliRunner()


def noise(path: Path, size: tuple[int, int] = (32, 24), base: int | None = None) -> Path:
    """A photo whose pixels depend on its path (no two alike); with `base`, a flat grey one with mild noise."""
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    if base is None:
        pixels = rng.integers(0, 255, (size[1], size[0], 3))
    else:
        pixels = np.clip(base + rng.integers(-6, 7, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def source(root: Path, reference: bool = True) -> Path:
    for i in range(6):
        noise(root / "ok" / f"o{i}.png", base=200)
    for i in range(4):
        noise(root / "ng" / "scratch" / f"n{i}.png")
    if reference:
        noise(root / "Reference" / "golden.png", base=200)
    return root


def dataset(out: Path) -> tuple[dict, list[dict]]:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    samples = [s for name in ("train.json", "val.json") for s in json.loads((out / name).read_text(encoding="utf-8"))]
    return manifest, samples


# ---------------------------------------------------------------- prepare


@pytest.mark.parametrize("language", ["en", "zh"])
def test_prepare_with_a_reference_folder_shows_it_first_and_says_so(tmp_path: Path, language: str):
    src = source(tmp_path / "photos")
    shutil.copyfile(src / "Reference" / "golden.png", src / "ok" / "copy-of-golden.png")  # a reference is no sample
    out = prepare(PrepareConfig(src=str(src), out=str(tmp_path / "data"), language=language, product="box"))
    manifest, samples = dataset(out)
    golden = hashlib.sha256((src / "Reference" / "golden.png").read_bytes()).hexdigest()
    assert manifest["reference"]["mode"] == "folder"
    assert [(p["file"], p["source"], p["sha256"]) for p in manifest["reference"]["photos"]] == [
        ("ref_01.png", "Reference/golden.png", golden)
    ]
    assert manifest["ignored_folders"] == [] and manifest["counts"]["by_class"] == {"NG": 4, "OK": 6}
    assert any("copy-of-golden" in d["path"] for d in manifest["duplicates"])
    assert read_reference_folder(out / "reference").sha256 == (golden,)
    intro = load_prompts(language).reference_intros("box")["one"]
    for sample in samples:
        first = sample["conversations"][0]["value"]
        assert sample["reference"] == ["reference/ref_01.png"]
        assert first.startswith("<image>\n<image>\n" + intro) and first.count("<image>") == 2
    assert read_contained_llava_json(out / "train.json", out)  # the reader takes what prepare wrote
    assert manifest["prompts"]["reference_intro"]["one"] == intro


def test_prepare_chooses_the_most_typical_ok_photos_and_takes_them_out(tmp_path: Path):
    src = source(tmp_path / "photos", reference=False)
    noise(src / "ok" / "odd.png", base=40)  # a dark OK photo: no golden sample
    out = prepare(PrepareConfig(src=str(src), out=str(tmp_path / "data"), reference="ok", reference_count=2))
    manifest, samples = dataset(out)
    chosen = [p["source"] for p in manifest["reference"]["photos"]]
    assert manifest["reference"]["mode"] == "ok" and len(chosen) == 2 and "ok/odd.png" not in chosen
    assert not {s["source"] for s in samples} & set(chosen)  # neither trained on nor validated
    assert manifest["counts"]["by_class"]["OK"] == 5
    assert all(s["conversations"][0]["value"].count("<image>") == 3 for s in samples)
    few = tmp_path / "few"
    shutil.copytree(src / "ng", few / "ng")
    noise(few / "ok" / "a.png", base=200), noise(few / "ok" / "b.png", base=200)
    with pytest.raises(DataError, match="at least one must stay a sample"):
        prepare(PrepareConfig(src=str(few), out=str(tmp_path / "d2"), reference="ok", reference_count=2))


def test_prepare_reference_none_writes_the_single_photo_data_byte_for_byte(tmp_path: Path):
    without = source(tmp_path / "b", reference=False)
    with_folder = Path(shutil.copytree(without, tmp_path / "a"))
    noise(with_folder / "Reference" / "golden.png", base=200)
    none = prepare(PrepareConfig(src=str(with_folder), out=str(tmp_path / "none"), reference="none"))
    plain = prepare(PrepareConfig(src=str(without), out=str(tmp_path / "plain")))
    for name in ("train.json", "val.json", *(f"images/{p.name}" for p in (plain / "images").iterdir())):
        assert (none / name).read_bytes() == (plain / name).read_bytes(), name
    manifest, samples = dataset(none)
    assert "reference" not in manifest and not (none / "reference").exists()
    assert [Path(f).name for f in manifest["ignored_folders"]] == ["Reference"]  # as before references existed
    assert all("reference" not in s and s["conversations"][0]["value"].count("<image>") == 1 for s in samples)


def test_prepare_reference_settings_are_checked(tmp_path: Path):
    src = source(tmp_path / "photos")
    with pytest.raises(ConfigError) as err:
        prepare(PrepareConfig(src=str(src), out=str(tmp_path / "d"), reference="nowhere", reference_count=9))
    assert "reference: nowhere" in str(err.value) and "reference_count: 9" in str(err.value)
    for i in range(MAX_REFERENCES + 1):
        noise(tmp_path / "many" / f"g{i}.png")
    with pytest.raises(DataError, match="keep at most"):
        prepare(PrepareConfig(src=str(src), out=str(tmp_path / "d"), reference=str(tmp_path / "many")))


def test_llava_json_samples_list_their_references_and_one_image_each(tmp_path: Path):
    noise(tmp_path / "a.png")
    noise(tmp_path / "ref.png")
    good = {
        "image": "a.png",
        "reference": ["ref.png"],
        "conversations": [{"from": "human", "value": "<image><image>Is it OK?"}, {"from": "gpt", "value": "OK."}],
    }
    bad = [
        {**good, "reference": ["gone.png"]},
        {**good, "reference": "ref.png"},
        {**good, "conversations": [{"from": "human", "value": "<image>Is it OK?"}, {"from": "gpt", "value": "OK."}]},
    ]
    (tmp_path / "good.json").write_text(json.dumps([good]))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "out.json").write_text(json.dumps([{**good, "reference": ["../x.png"]}]))
    noise(tmp_path.parent / "x.png")
    assert read_llava_json(tmp_path / "good.json", tmp_path)[0]["conversations"][0]["value"] == (
        "<image>\n<image>\nIs it OK?"
    )
    with pytest.raises(DataError) as err:
        read_llava_json(tmp_path / "bad.json", tmp_path)
    text = str(err.value)
    assert "reference 'gone.png' not found" in text and "list of path texts" in text and "appears 1 times" in text
    with pytest.raises(DataError, match="outside"):
        read_contained_llava_json(tmp_path / "out.json", tmp_path)


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("seed", range(12))
def test_augmentation_never_moves_the_photo_and_its_reference_differently(seed: int):
    photo = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3)).astype(np.uint8))
    boxes = [[40.0, 5.0, 50.0, 15.0]] if seed % 2 else []
    same, moved, (reference,) = augment_with_references(photo, boxes, [photo.copy()], random.Random(seed))
    assert reference.size == same.size and np.array_equal(np.asarray(reference), np.asarray(same))
    half = photo.resize((32, 24))  # a reference of another size gets the same turn, light and crop, by share
    _, _, (small,) = augment_with_references(photo, boxes, [half], random.Random(seed))
    assert abs(small.width / 32 - same.width / 64) < 0.05 and abs(small.height / 24 - same.height / 48) < 0.07


# ---------------------------------------------------------------- training items and the memory plan


@pytest.mark.parametrize("name", FAMILIES)
def test_two_image_conversations_are_supervised_only_on_the_answer(tiny_model, reference_dataset: Path, name: str):
    family, processor = family_named(name), load_processor(tiny_model(name), 64)
    data = DatasetFolder.open(reference_dataset)
    items = ConversationDataset(data.samples(), data.image_root, processor, 2048, family, augment=True, seed=3)
    tokenizer = processor.tokenizer
    for index in (0, 1):
        item, sample = items[index], data.samples()[index]
        supervised = tokenizer.decode(item["labels"][item["labels"] != -100])
        answers = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
        assert [a.strip() for a in answers] == [a.strip() for a in _split_answers(supervised, tokenizer)]
        assert len(item["input_ids"]) == items.lengths[index]  # the estimate the memory plan reads is exact
        image_token = (item["input_ids"] == processor.image_token_id).int()
        images = int((image_token[1:] > image_token[:-1]).sum() + image_token[0])  # runs of image tokens
        assert images == 2  # the reference's part, then the photo's


def _split_answers(text: str, tokenizer) -> list[str]:
    ends = [t for t in ("</s>", "<|im_end|>", "<end_of_turn>") if t in text]
    return [part for part in text.split(ends[0]) if part.strip()] if ends else [text]


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3", "llava"])
def test_the_memory_plan_counts_the_references_tokens(
    tiny_model, spot_dataset: Path, reference_dataset: Path, name: str
):
    from vlm_inspect.models.load import load_model
    from vlm_inspect.training.memory import estimate_memory_gib

    family, processor = family_named(name), load_processor(tiny_model(name), 64)
    plain, with_ref = DatasetFolder.open(spot_dataset), DatasetFolder.open(reference_dataset)
    alone = ConversationDataset(plain.samples(), plain.image_root, processor, 2048, family)
    beside = ConversationDataset(with_ref.samples(), with_ref.image_root, processor, 2048, family)
    photo, reference = beside.image_tokens[0]
    assert alone.image_tokens[0] == (photo, 0)
    intro = load_prompts("en").reference_intros("box")["one"]
    said = conversation(processor, [(f"{intro} Is this box OK or NG?", "OK.")]).ids
    text = len(said) - len(conversation(processor, [("Is this box OK or NG?", "OK.")]).ids)
    grown = {b - a for a, b in zip(alone.lengths, beside.lengths, strict=True)}  # the same for every sample:
    assert len(grown) == 1 and 0 <= grown.pop() - reference - text <= 4  # the reference's tokens, the intro's, markers
    assert reference == photo > 0  # the same photo size costs the same again
    model = load_model(tiny_model(name), dtype="fp32", device="cpu")
    assert estimate_memory_gib(model, 8, max(beside.lengths), 0) > estimate_memory_gib(model, 8, max(alone.lengths), 0)


# ---------------------------------------------------------------- run → merged model → predictor


def test_the_predictor_judges_against_the_runs_references_by_default_and_says_which(
    tiny_model, reference_dataset: Path, tmp_path: Path
):
    from vlm_inspect.inference import Predictor

    model = tiny_model("qwen2_5_vl")
    run = make_run(tmp_path / "run", model, reference_dataset, image_max_tokens=64)
    predictor = Predictor.load(ModelSettings(model=str(model), adapter=str(run), device="cpu"))
    assert predictor.reference.record()["photos"][0]["file"] == "ref_01.png"
    assert (
        predictor.reference_for(None) is predictor.reference and predictor.reference_for(NO_REFERENCE) is NO_REFERENCE
    )
    photos = [Image.open(p).convert("RGB") for p in sorted((reference_dataset / "images").glob("*.png"))[:3]]
    run_ref = read_reference_folder(run / "reference")
    default = predictor.score(photos, "Is this box OK or NG?")
    assert predictor.score(photos, "Is this box OK or NG?", reference=run_ref) == pytest.approx(default, abs=1e-6)
    assert predictor.score(photos, "Is this box OK or NG?", reference=NO_REFERENCE) != pytest.approx(default, abs=1e-6)
    intro = load_prompts("en").reference_intros("box")["one"]
    assert f"{intro} Is this box OK or NG?" in predictor.prompt("Is this box OK or NG?")
    alone = Predictor.load(ModelSettings(model=str(model), adapter=str(run), device="cpu", reference="none"))
    assert not alone.reference and intro not in alone.prompt("Is this box OK or NG?")
    folder = reference_dataset / "reference"
    given = Predictor.load(ModelSettings(model=str(model), adapter=str(run), device="cpu", reference=str(folder)))
    assert given.reference.label() == "reference: ref_01.png"


@pytest.mark.integration
def test_references_travel_from_the_run_into_a_merged_model(tiny_model, reference_dataset: Path, tmp_path: Path):
    from vlm_inspect.inference import Predictor

    model = tiny_model("llava")
    run = make_run(tmp_path / "run", model, reference_dataset)
    merged = tmp_path / "merged"
    result = runner.invoke(app, ["merge", "--model", str(model), "--adapter", str(run), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    assert (merged / "train_reference" / "reference.json").read_bytes() == (
        run / "reference" / "reference.json"
    ).read_bytes()
    served = Predictor.load(ModelSettings(model=str(merged), device="cpu"))
    assert served.reference.record() == read_reference_folder(reference_dataset / "reference").record()
    rows = tmp_path / "p.jsonl"
    result = runner.invoke(
        app, ["predict", str(reference_dataset / "images" / "001.png"), "--model", str(merged), "--out", str(rows)]
    )
    assert result.exit_code == 0 and "judged against references: run: ref_01.png" in result.output
    assert json.loads(rows.read_text())["reference"]["photos"][0]["file"] == "ref_01.png"


def test_reference_from_bytes_checks_each_photo_and_the_count():
    ok = Image.new("RGB", (8, 8))
    buffer = io.BytesIO()
    ok.save(buffer, "PNG")
    data = buffer.getvalue()
    reference = Reference.from_bytes("upload", [("a.png", data)])
    assert reference.record() == {
        "name": "upload",
        "photos": [{"file": "a.png", "sha256": hashlib.sha256(data).hexdigest()}],
    }
    with pytest.raises(DataError, match="not an image"):
        Reference.from_bytes("upload", [("b.png", b"not a photo")])
    with pytest.raises(DataError, match="at most"):
        Reference.from_bytes("upload", [("a.png", data)] * (MAX_REFERENCES + 1))
    assert NO_REFERENCE.record() is None and NO_REFERENCE.label() == "none"


def test_shipped_prompts_need_a_reference_intro(tmp_path: Path):
    import yaml

    from vlm_inspect.data.prompts import PROMPTS_FILE

    data = yaml.safe_load(PROMPTS_FILE.read_text(encoding="utf-8"))
    data["en"]["reference_intro"] = {"one": "First is good {thing}."}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_prompts("en", tmp_path / "p.yaml")
    assert "reference_intro.many: missing" in str(err.value) and "{thing}" in str(err.value)


@pytest.mark.integration
def test_evaluate_puts_the_models_with_and_without_their_reference_side_by_side(
    tiny_model, reference_dataset: Path, spot_dataset: Path, tmp_path: Path
):
    model = tiny_model("llava")
    run = make_run(tmp_path / "run", model, reference_dataset)
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(model), "--adapter", str(run), "--data", str(reference_dataset)]
    result = runner.invoke(app, [*args, "--out", str(out), "--gallery-size", "2", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    section, q0 = results["reference"], results["questions"][0]["id"]
    assert section["reason"] is None and section["thumbnails"][0]["file"] == "ref_01.png"
    rows = {(r["key"], r["with_reference"]): r for r in section["rows"]}
    assert set(rows) == {("tuned", True), ("tuned", False), ("base", True), ("base", False)}
    for key in ("tuned", "base"):  # "with" is the main table's scoring; "without" is the photo alone
        assert rows[(key, True)]["metrics"] == results["metrics"][key][q0]
        assert (
            rows[(key, True)]["reference"]["photos"][0]["file"] == "ref_01.png" and not rows[(key, False)]["reference"]
        )
        assert rows[(key, True)]["p_ng"] != rows[(key, False)]["p_ng"]
    html = (out / "report.html").read_text()
    assert "What the reference buys" in html and html.count('data-with="') == 4
    plain = make_run(tmp_path / "plain", model, spot_dataset)
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(model),
            "--adapter",
            str(plain),
            "--data",
            str(spot_dataset),
            "--out",
            str(tmp_path / "r2"),
            "--gallery-size",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "has no references" in json.loads((tmp_path / "r2" / "results.json").read_text())["reference"]["reason"]


def test_the_tuned_models_boxes_with_and_without_its_reference_are_measured_alike(tmp_path: Path):
    """The "with" boxes are evaluate's own (asked with the reference); "without" asks again on the same photos;
    both go through localization.py's measures."""
    from types import SimpleNamespace

    from vlm_inspect.data.sources import Item
    from vlm_inspect.evaluation.localization import located_photo
    from vlm_inspect.evaluation.reference import reference_comparison
    from vlm_inspect.inference import Answer

    path = tmp_path / "p.png"
    Image.new("RGB", (100, 100), "white").save(path)
    truth = [10.0, 10.0, 30.0, 30.0]
    ng = [Item(f"ng{i}", path, "p.png", "NG", "spot", [{"type": "spot", "box": truth}]) for i in range(3)]
    ok = [Item(f"ok{i}", path, "p.png", "OK") for i in range(2)]
    items = [*ng, *ok]
    golden = Reference("run", (Image.new("RGB", (100, 100)),), ("ref_01.png",), ("a" * 64,))

    class Model:
        reference, asked = golden, []

        def score(self, images, question, batch_size=8, reference=None):
            return [0.5] * len(images)

        def locate(self, images, max_new_tokens, batch_size, reference=None):
            self.asked.append(reference)  # alone, the model points off the defect and boxes OK photos
            return [Answer(None, [{"type": "spot", "box": [60.0, 60.0, 90.0, 90.0]}], 0) for _ in images]

    model = Model()
    with_boxes = {i.id: located_photo(i, [{"type": "spot", "box": truth}] if i.label == "NG" else [], 0) for i in items}
    question = SimpleNamespace(id="q0", text="Is this box OK or NG?")
    results = {
        "images": [{"p_ng": {"tuned": {"q0": 0.5}}} for _ in items],
        "metrics": {"tuned": {"q0": {"kept": "as evaluate computed it"}}},
        "models": {"tuned": {"name": "tuned"}},
    }
    settings = SimpleNamespace(threshold=0.5, max_escape=0.0, batch_size=4, max_new_tokens=16)
    section = reference_comparison(
        iter([("tuned", model, {})]), items, question, results, settings, {"tuned": {"photos": with_boxes}}
    )
    with_row, alone = section["rows"]
    assert with_row["metrics"] == {"kept": "as evaluate computed it"} and model.asked == [NO_REFERENCE]
    assert with_row["localization"]["acc_iou"]["0.5"]["value"] == 1.0 and with_row["localization"]["n_ok"] == 2
    assert alone["localization"]["acc_iou"]["0.5"]["value"] == 0.0 and alone["localization"]["pointing"]["value"] == 0
    assert alone["localization"]["false_alarms_per_ok_photo"]["value"] == 1.0

"""`vlm-inspect prepare` over generated messy photo folders: layouts, sidecars, masks, bad inputs, split, safety."""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlm_inspect.cli import app
from vlm_inspect.config import PrepareConfig
from vlm_inspect.data.llava_json import read_llava_json
from vlm_inspect.data.mvtec import mask_boxes
from vlm_inspect.data.prompts import load_prompts
from vlm_inspect.data.sources import collect_images
from vlm_inspect.errors import ConfigError, DataError, OutputExistsError
from vlm_inspect.prepare import few_val_caveat, prepare, stratified_split

# ---------------------------------------------------------------- helpers


def photo(path: Path, size: tuple[int, int] = (32, 24), mode: str = "RGB", **save: Any) -> Path:
    """A noise photo whose pixels depend on its path, so no two generated files are identical."""
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if mode == "RGB" else image.convert(mode)).save(path, **save)
    return path


def photos(folder: Path, n: int, suffix: str = ".png") -> list[Path]:
    return [photo(folder / f"img{i:02d}{suffix}") for i in range(n)]


def class_tree(root: Path, ok: int = 6, ng: dict[str, int] | None = None) -> Path:
    photos(root / "ok", ok, ".jpg")
    for defect, n in (ng or {"scratch": 4}).items():
        photos(root / "ng" / defect, n)
    return root


def run(src: Path, out: Path, **settings: Any) -> Path:
    return prepare(PrepareConfig(src=str(src), out=str(out), **settings))


def samples(out: Path, name: str = "train.json") -> list[dict[str, Any]]:
    return json.loads((out / name).read_text(encoding="utf-8"))


def all_samples(out: Path) -> list[dict[str, Any]]:
    return samples(out, "train.json") + samples(out, "val.json")


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def answers(sample: dict[str, Any]) -> list[str]:
    return [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]


def by_source(out: Path) -> dict[str, dict[str, Any]]:
    return {s["source"]: s for s in all_samples(out)}


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mask(path: Path, size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> None:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        array[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ---------------------------------------------------------------- layouts


def test_class_folders_aliases_any_case_and_defect_subfolders(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    photos(src / "Good", 4, ".jpg")
    photos(src / "NORMAL", 2, ".jpg")
    photos(src / "Defective" / "scratch", 3)
    photos(src / "Defective", 2)  # directly in the NG folder: no defect type
    out = run(src, tmp_path / "ds", product="box")

    counts = manifest(out)["counts"]
    assert counts["by_class"] == {"NG": 5, "OK": 6}
    assert counts["by_defect_type"] == {"(unknown)": 2, "scratch": 3}
    for sample in all_samples(out):
        assert (out / sample["image"]).is_file()
        first = answers(sample)[0]
        assert first.startswith(f"{sample['label']}. ")
        if sample["defect_type"] == "scratch":
            assert first == "NG. There is a scratch on the box."
            assert len(sample["conversations"]) == 4
        elif sample["label"] == "NG":
            assert first == "NG. The box has a visible defect."
            assert len(sample["conversations"]) == 2  # nothing more known: no describe turn
        else:
            assert first == "OK. The box has no visible defects."
    names = sorted(p.name for p in (out / "images").iterdir())
    assert "ng_scratch_0001.png" in names and "ok_0001.jpg" in names and len(set(names)) == 11


def test_extra_folder_names_and_missing_class_message(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    photos(src / "Fine", 2)
    photos(src / "REJECT", 2)
    with pytest.raises(DataError) as err:
        run(src, tmp_path / "a")
    assert str(src) in str(err.value) and "no OK and no NG class folder" in str(err.value)
    assert "Fine, REJECT" in str(err.value)

    out = run(src, tmp_path / "b", ok_names=["fine"], ng_names=["reject"])
    assert manifest(out)["counts"]["by_class"] == {"NG": 2, "OK": 2}


def test_mvtec_layout_with_masks_gives_location_words(tmp_path: Path) -> None:
    src = tmp_path / "bottle"
    photos(src / "train" / "good", 3)
    photos(src / "test" / "good", 2)
    (src / "license.txt").write_text("CC BY-NC-SA")
    size = (90, 60)
    for stem in ("000", "001", "002"):
        photo(src / "test" / "broken_large" / f"{stem}.png", size=size)
    mask(src / "ground_truth" / "broken_large" / "000_mask.png", size, [(70, 2, 85, 15)])
    mask(src / "ground_truth" / "broken_large" / "001_mask.png", size, [(2, 2, 12, 12), (75, 45, 88, 58)])
    # 002 has no mask: type known, place unknown.

    out = run(src, tmp_path / "ds", product="bottle", val_fraction=0)

    assert manifest(out)["source"]["layout"] == "mvtec"
    found = by_source(out)
    one = found["test/broken_large/000.png"]
    assert one["defects"] == [{"type": "broken_large", "box": [70, 2, 85, 15]}]
    assert answers(one)[0] == "NG. There is a broken large near the top right corner of the bottle."
    two = found["test/broken_large/001.png"]
    assert len(two["defects"]) == 2
    assert "There are 2 defects." in answers(two)[1]
    assert "top left corner" in answers(two)[1] and "bottom right corner" in answers(two)[1]
    none = found["test/broken_large/002.png"]
    assert none["defects"] == [] and answers(none)[0] == "NG. There is a broken large on the bottle."
    assert manifest(out)["counts"]["by_class"] == {"NG": 3, "OK": 5}


def test_mask_boxes_separate_regions_largest_first() -> None:
    array = np.zeros((300, 400), dtype=bool)
    array[10:20, 10:30] = True
    array[200:290, 300:390] = True
    assert mask_boxes(array) == [[300, 200, 390, 290], [10, 10, 30, 20]]
    assert mask_boxes(np.zeros((5, 5), dtype=bool)) == []


def test_sidecars_give_descriptions_and_boxes_in_upright_pixels(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    photo(src / "ok" / "clean.png")
    (src / "ok" / "clean.txt").write_text("Clean surface, label straight\n")
    photos(src / "ok", 2)
    photo(src / "ng" / "a.png")
    (src / "ng" / "a.txt").write_text("black mark next to the barcode")
    photo(src / "ng" / "b.png", size=(90, 60))
    (src / "ng" / "b.json").write_text(json.dumps({"defects": [{"type": "dent", "box": [0, 40, 20, 60]}]}))
    # Stored 60x30 with EXIF "rotate 90° clockwise": upright it is 30x60, and sidecar boxes use upright pixels.
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(src / "ng" / "c.jpg", size=(60, 30), exif=exif)
    (src / "ng" / "c.json").write_text(
        json.dumps({"description": "Torn flap", "defects": [{"type": "tear", "box": [0, 50, 10, 60]}]})
    )

    out = run(src, tmp_path / "ds", product="box", val_fraction=0)

    found = by_source(out)
    assert answers(found["ok/clean.png"]) == ["OK. Clean surface, label straight."]
    assert answers(found["ng/a.png"]) == ["NG. The box has a visible defect.", "Black mark next to the barcode."]
    assert answers(found["ng/b.png"])[0] == "NG. There is a dent near the bottom left corner of the box."
    assert found["ng/b.png"]["defect_type"] == "dent"
    c = found["ng/c.jpg"]
    assert c["defects"] == [{"type": "tear", "box": [0, 50, 10, 60]}]
    assert answers(c) == [
        "NG. There is a tear near the bottom left corner of the box.",
        "Torn flap. There is a tear near the bottom left corner of the box.",
    ]


def test_bad_sidecars_are_one_error_naming_each_file(tmp_path: Path) -> None:
    src = class_tree(tmp_path / "photos")
    bad_box = src / "ng" / "scratch" / "img00.json"
    bad_box.write_text(json.dumps({"defects": [{"type": "scratch", "box": [0, 0, 500, 10]}], "lable": "x"}))
    bad_ok = src / "ok" / "img00.json"
    bad_ok.write_text(json.dumps({"defects": [{"type": "dent", "box": [0, 0, 5, 5]}]}))
    (src / "ng" / "scratch" / "img01.json").write_text("{not json")

    with pytest.raises(DataError) as err:
        run(src, tmp_path / "ds")

    message = str(err.value)
    assert f"{bad_box}: unknown key 'lable'" in message
    assert "reaches outside the 32x24 upright image" in message
    assert f"{bad_ok}: lists defects but img00.jpg is in an OK folder" in message
    assert "img01.json: not valid UTF-8 JSON" in message
    assert not (tmp_path / "ds").exists()


def test_chinese_conversations(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    photos(src / "ok", 3)
    photo(src / "ng" / "污渍" / "a.png", size=(90, 60))
    (src / "ng" / "污渍" / "a.json").write_text(json.dumps({"defects": [{"box": [0, 0, 10, 10]}]}))
    photos(src / "ng" / "污渍", 2)

    out = run(src, tmp_path / "ds", language="zh", product="盒子", val_fraction=0)

    zh = load_prompts("zh")
    questions = {q.format(product="盒子") for q in zh.verdict_questions}
    for sample in all_samples(out):
        assert answers(sample)[0].startswith(f"{sample['label']}。")
        assert sample["conversations"][0]["value"].removeprefix("<image>\n") in questions
    located = by_source(out)["ng/污渍/a.png"]
    assert answers(located)[0] == "NG。盒子左上角附近有污渍。"
    assert any(p.name.startswith("ng_污渍_") for p in (out / "images").iterdir())
    assert manifest(out)["prompts"]["default_question"] == zh.default_question("盒子")
    assert (manifest(out)["language"], manifest(out)["product"]) == ("zh", "盒子")
    assert manifest(out)["default_question"] == zh.default_question("盒子")


def test_chinese_default_product_word(tmp_path: Path) -> None:
    out = run(class_tree(tmp_path / "photos"), tmp_path / "ds", language="zh")
    assert all("产品" in answers(s)[0] for s in all_samples(out))


# ---------------------------------------------------------------- split and summary


def test_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    src = class_tree(tmp_path / "photos", ok=20, ng={"scratch": 10, "dent": 5})
    first = run(src, tmp_path / "a", val_fraction=0.2, seed=1)
    again = run(src, tmp_path / "b", val_fraction=0.2, seed=1)
    other = run(src, tmp_path / "c", val_fraction=0.2, seed=2)

    val = manifest(first)["split"]["val"]
    assert val["by_class"] == {"NG": 3, "OK": 4}
    assert val["by_defect_type"] == {"dent": 1, "scratch": 2}

    def val_sources(out: Path) -> set[str]:
        return {s["source"] for s in samples(out, "val.json")}

    assert val_sources(first) == val_sources(again)
    assert val_sources(first) != val_sources(other)
    assert [s["conversations"] for s in samples(first)] == [s["conversations"] for s in samples(again)]
    assert not val_sources(first) & {s["source"] for s in samples(first)}


def test_stratified_split_small_strata() -> None:
    is_val = stratified_split(["a"] + ["b"] * 2 + ["c"] * 10, 0.2, seed=0)
    assert is_val[0] is False  # a lone item always trains
    assert sum(is_val[1:3]) == 1  # two items: one each side
    assert sum(is_val[3:]) == 2
    assert stratified_split(["a"] * 5, 0.0, seed=0) == [False] * 5
    # Adding a class leaves the split of the others unchanged.
    ok_only = stratified_split(["OK/"] * 10, 0.3, seed=4)
    assert stratified_split(["OK/"] * 10 + ["NG/dent"] * 5, 0.3, seed=4)[:10] == ok_only


def test_summary_table_and_caveat_for_small_val(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(class_tree(tmp_path / "photos"), tmp_path / "ds")
    printed = capsys.readouterr().out
    assert "vlm-inspect prepare" in printed and "scratch" in printed and "train" in printed
    assert "only 2 validation images (1 OK, 1 NG)" in " ".join(printed.split())
    assert "3/n" in printed


def test_caveat_thresholds() -> None:
    assert few_val_caveat(15, 15, 30) is None
    text = few_val_caveat(10, 5, 15)
    assert text is not None and "overkill below 30 %" in text and "escape below 60 %" in text
    assert "no validation images" in (few_val_caveat(0, 0, 0) or "")


def test_verdict_questions_vary_and_held_out_ones_are_never_trained(tmp_path: Path) -> None:
    out = run(class_tree(tmp_path / "photos", ok=12, ng={"scratch": 12}), tmp_path / "ds", product="box")
    prompts = load_prompts("en")
    asked = [s["conversations"][0]["value"].removeprefix("<image>\n") for s in all_samples(out)]
    assert len(set(asked)) >= 8
    assert prompts.default_question("box") in asked
    held_out = {q.format(product="box") for q in prompts.heldout_questions}
    every_turn = {t["value"] for s in all_samples(out) for t in s["conversations"]}
    assert not {q for q in every_turn if q.removeprefix("<image>\n") in held_out}


# ---------------------------------------------------------------- bad inputs


def test_bad_files_skipped_with_reasons_odd_modes_converted(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    photos(src / "ok", 2)
    photo(src / "ok" / "cmyk.jpg", mode="CMYK")
    photo(src / "ok" / "palette.png", mode="P")
    photo(src / "ok" / "la.png", mode="LA")
    photo(src / "ok" / "rgba.png", mode="RGBA")
    Image.fromarray(np.full((24, 32), 40000, dtype=np.uint16)).save(src / "ok" / "sixteen.png")
    photo(src / "ok" / "Photo.JPG")
    photos(src / "ng", 3)
    (src / "ng" / "zero.jpg").write_bytes(b"")
    (src / "ng" / "notes.jpg").write_text("not a photo")
    (src / "ng" / "cut.png").write_bytes(photo(tmp_path / "whole.png", size=(64, 64)).read_bytes()[:200])
    photo(src / "ng" / "huge.png", size=(100, 100))
    (src / "ng" / ".DS_Store").write_bytes(b"\0\1")

    out = run(src, tmp_path / "ds", max_image_pixels=5_000, val_fraction=0)

    reasons = {Path(s["path"]).name: s["reason"] for s in manifest(out)["skipped"]}
    assert set(reasons) == {"zero.jpg", "notes.jpg", "cut.png", "huge.png"}
    assert "empty file" in reasons["zero.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    assert "truncated" in reasons["cut.png"]
    assert "more than the limit of 5,000" in reasons["huge.png"]
    found = by_source(out)
    for name in ("cmyk.jpg", "palette.png", "la.png", "rgba.png", "sixteen.png", "Photo.JPG"):
        copy = out / found[f"ok/{name}"]["image"]
        assert _sha(copy) == _sha(src / "ok" / name)  # copied, never re-encoded
    assert found["ok/Photo.JPG"]["image"].endswith(".jpg")


def test_duplicates_are_reported_and_conflicting_labels_dropped(tmp_path: Path) -> None:
    src = class_tree(tmp_path / "photos")
    shutil.copyfile(src / "ok" / "img00.jpg", src / "ok" / "copy.jpg")
    shutil.copyfile(src / "ok" / "img01.jpg", src / "ng" / "scratch" / "also_ok.jpg")

    images, skipped = collect_images(src)

    reasons = {s.path.name: s for s in skipped}
    assert reasons["img00.jpg"].duplicate_of == src / "ok" / "copy.jpg"  # the first in sorted order is kept
    assert "conflicting labels" in reasons["also_ok.jpg"].reason
    assert "conflicting labels" in reasons["img01.jpg"].reason
    kept_ok = {im.path.name for im in images if im.label == "OK"}
    assert kept_ok == {"copy.jpg", "img02.jpg", "img03.jpg", "img04.jpg", "img05.jpg"}
    assert {im.path.name for im in images if im.label == "NG"} == {f"img0{i}.png" for i in range(4)}

    out = run(src, tmp_path / "ds")
    duplicate = {"path": str(src / "ok" / "img00.jpg"), "same_as": str(src / "ok" / "copy.jpg")}
    assert manifest(out)["duplicates"] == [duplicate]
    assert len(manifest(out)["skipped"]) == 2


def test_missing_or_empty_class_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    only_ok = tmp_path / "only_ok"
    photos(only_ok / "ok", 2)
    with pytest.raises(DataError, match="no NG class folder"):
        run(only_ok, tmp_path / "a")

    empty_type = class_tree(tmp_path / "empty_type")
    (empty_type / "ng" / "dent").mkdir()
    with pytest.raises(DataError) as err:
        run(empty_type, tmp_path / "b")
    assert f"{empty_type / 'ng' / 'dent'}: no photos" in str(err.value)

    all_broken = tmp_path / "all_broken"
    photos(all_broken / "ok", 2)
    (all_broken / "ng").mkdir()
    (all_broken / "ng" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError) as err:
        run(all_broken, tmp_path / "c")
    assert f"{all_broken / 'ng'}: no usable photo" in str(err.value) and "empty file" in str(err.value)
    assert not any((tmp_path / n).exists() for n in "abc")


# ---------------------------------------------------------------- safety of inputs and outputs


def test_inputs_are_byte_identical_afterwards(tmp_path: Path) -> None:
    src = class_tree(tmp_path / "photos", ng={"scratch": 3, "dent": 2})
    (src / "ng" / "scratch" / "img00.txt").write_text("long scratch")
    (src / "ok" / "broken.jpg").write_bytes(b"")
    before = tree_hashes(src)
    run(src, tmp_path / "ds")
    assert tree_hashes(src) == before


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    src = class_tree(tmp_path / "photos")
    out = tmp_path / "ds"
    out.mkdir()
    run(src, out)  # an existing empty folder is fine
    (out / "mine.txt").write_text("user file")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run(src, out)
    assert (out / "mine.txt").exists()

    run(src, out, overwrite=True, seed=5)
    assert not (out / "mine.txt").exists() and (out / "manifest.json").exists()
    assert manifest(out)["settings"]["seed"] == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_run_leaves_no_manifest_and_keeps_the_old_dataset(tmp_path: Path, monkeypatch) -> None:
    src = class_tree(tmp_path / "photos")
    copies = {"n": 0}
    real_copy = shutil.copyfile

    def copy_then_interrupt(a: Path, b: Path) -> Any:
        copies["n"] += 1
        if copies["n"] == 3:
            raise KeyboardInterrupt
        return real_copy(a, b)

    monkeypatch.setattr(shutil, "copyfile", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert list(tmp_path.rglob("manifest.json")) == []
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]

    monkeypatch.setattr(shutil, "copyfile", real_copy)
    old = run(src, tmp_path / "old")
    before = tree_hashes(old)
    monkeypatch.setattr(shutil, "copyfile", copy_then_interrupt)
    copies["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        run(src, old, overwrite=True, seed=9)
    assert tree_hashes(old) == before


def test_settings_problems_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        prepare(PrepareConfig(src=str(tmp_path / "missing"), out="", val_fraction=1.5, max_image_pixels=0))
    problems = err.value.problems
    assert len(problems) == 4
    assert any("is not a folder" in p for p in problems) and any("val_fraction" in p for p in problems)

    with pytest.raises(ConfigError) as err:
        prepare(PrepareConfig(from_llava_json=str(tmp_path / "x.json"), out=str(tmp_path / "o")))
    assert any("image_folder: required" in p for p in err.value.problems)
    assert any("is not a file" in p for p in err.value.problems)

    src = class_tree(tmp_path / "photos")
    with pytest.raises(ConfigError, match="overlaps src"):
        run(src, src / "dataset")
    with pytest.raises(ConfigError, match="overlaps src"):
        run(src, tmp_path, overwrite=True)


# ---------------------------------------------------------------- LLaVA JSON


def test_output_is_original_llava_format_and_round_trips(tmp_path: Path) -> None:
    src = class_tree(tmp_path / "photos", ok=5, ng={"scratch": 3})
    (src / "ng" / "scratch" / "img00.json").write_text(
        json.dumps({"defects": [{"type": "scratch", "box": [1, 1, 5, 5]}]})
    )
    first = run(src, tmp_path / "ds")

    for name in ("train.json", "val.json"):
        checked = read_llava_json(first / name, first)
        assert checked == samples(first, name)  # already normalised: reading changes nothing
        for sample in checked:
            assert sample["conversations"][0]["value"].startswith("<image>\n")
            assert [t["from"] for t in sample["conversations"]] == ["human", "gpt"] * (
                len(sample["conversations"]) // 2
            )

    second = prepare(
        PrepareConfig(
            from_llava_json=str(first / "train.json"),
            image_folder=str(first),
            out=str(tmp_path / "ds2"),
            val_fraction=0,
        )
    )

    original = {s["id"]: s for s in samples(first)}
    copied = {s["id"]: s for s in samples(second)}
    assert copied.keys() == original.keys()
    for key, sample in copied.items():
        assert sample["conversations"] == original[key]["conversations"]
        assert sample["label"] == original[key]["label"] and sample["defects"] == original[key]["defects"]
        assert _sha(second / sample["image"]) == _sha(first / original[key]["image"])
    assert manifest(second)["source"]["layout"] == "llava_json"


def test_from_llava_json_infers_labels_keeps_shared_images_together_and_skips_bad_ones(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    for i in range(6):
        photo(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"")

    def sample(i: int, image: str, answer: str) -> dict[str, Any]:
        turns = [{"from": "human", "value": "Is it OK? <image>"}, {"from": "gpt", "value": answer}]
        return {"id": f"s{i}", "image": image, "conversations": turns}

    data = [sample(i, f"{i}.png", "OK" if i < 3 else "NG, a dent") for i in range(6)]
    data.append(sample(6, "0.png", "OK, clean"))  # a second conversation on image 0
    data.append(sample(7, "bad.png", "NG"))
    (tmp_path / "data.json").write_text(json.dumps(data))

    out = prepare(
        PrepareConfig(from_llava_json=str(tmp_path / "data.json"), image_folder=str(folder), out=str(tmp_path / "ds"))
    )

    found = {s["id"]: s for s in all_samples(out)}
    assert set(found) == {f"s{i}" for i in range(7)}
    assert found["s0"]["image"] == found["s6"]["image"]
    side = {s["id"]: name for name in ("train.json", "val.json") for s in samples(out, name)}
    assert side["s0"] == side["s6"]
    assert [found[f"s{i}"]["label"] for i in range(6)] == ["OK"] * 3 + ["NG"] * 3
    assert found["s0"]["conversations"][0]["value"] == "<image>\nIs it OK?"
    assert len(list((out / "images").iterdir())) == 6
    assert [Path(s["path"]).name for s in manifest(out)["skipped"]] == ["bad.png"]


def test_read_llava_json_reports_every_problem(tmp_path: Path) -> None:
    photo(tmp_path / "a.png")
    good = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "OK."}]
    data = [
        {"id": "fine", "image": "a.png", "conversations": good},
        {"id": "no-file", "image": "missing.png", "conversations": good},
        {"id": "role", "image": "a.png", "conversations": [{"from": "user", "value": "<image> Q"}, good[1]]},
        {"id": "order", "image": "a.png", "conversations": [good[1], good[0]]},
        {"id": "no-token", "image": "a.png", "conversations": [{"from": "human", "value": "Q?"}, good[1]]},
        {"id": "label", "image": "a.png", "conversations": good, "label": "bad"},
        "not a sample",
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))

    with pytest.raises(DataError) as err:
        read_llava_json(path, tmp_path)

    message = str(err.value)
    assert message.startswith(f"{path}: ")
    for expected in (
        "sample 1 (id 'no-file'): image 'missing.png' not found",
        "sample 2 (id 'role'): turn 0: 'from' is 'user'",
        "sample 3 (id 'order'): turn 0: from 'gpt', expected 'human'",
        "sample 4 (id 'no-token'): the first human turn has no <image>",
        "sample 5 (id 'label'): 'label' is 'bad'",
        "sample 6: expected an object",
    ):
        assert expected in message
    assert "sample 0" not in message

    path.write_text("{}")
    with pytest.raises(DataError, match="expected a JSON list"):
        read_llava_json(path, tmp_path)


# ---------------------------------------------------------------- CLI


def test_cli_prepare_writes_the_dataset(tmp_path: Path) -> None:
    src = class_tree(tmp_path / "photos")
    out = tmp_path / "ds"
    result = CliRunner().invoke(
        app, ["prepare", str(src), "--out", str(out), "--seed", "3", "--language", "en", "--product", "carton"]
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"train.json", "val.json", "images", "manifest.json", "config.yaml"}
    assert len(all_samples(out)) == 10
    assert all("carton" in answers(s)[0] for s in all_samples(out))

    again = CliRunner().invoke(app, ["prepare", str(src), "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output

"""The demo's synthetic box photos: seeded, in prepare's folder layout, and with honest defect boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlm_inspect.data.synthetic as synthetic
from vlm_inspect.data.synthetic import (
    DEFECT_KINDS,
    describe_defect,
    make_box_photo,
    render_box_photo,
    write_dataset_folders,
)
from vlm_inspect.errors import DataError, OutputExistsError

SIZE = 64


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pair(seed: int, kind: str, size: int = 128) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The same scene rendered OK and with one defect."""
    ok, _ = make_box_photo(np.random.default_rng(seed), None, size)
    ng, defects = make_box_photo(np.random.default_rng(seed), kind, size)
    return np.asarray(ok, np.int16), np.asarray(ng, np.int16), defects


def test_same_seed_writes_same_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    first = _tree_bytes(write_dataset_folders(tmp_path / "a", n_ok=3, n_ng=4, seed=7, size=SIZE))
    again = _tree_bytes(write_dataset_folders(tmp_path / "b", n_ok=3, n_ng=4, seed=7, size=SIZE))
    other = _tree_bytes(write_dataset_folders(tmp_path / "c", n_ok=3, n_ng=4, seed=8, size=SIZE))

    assert first == again
    assert first.keys() == other.keys()
    pngs = [name for name in first if name.endswith(".png")]
    assert all(first[name] != other[name] for name in pngs)


def test_photos_are_individually_different() -> None:
    photos = [np.asarray(make_box_photo(np.random.default_rng(s), None, SIZE)[0]) for s in range(4)]
    assert all(not np.array_equal(photos[0], p) for p in photos[1:])


def test_folder_layout_and_sidecars(tmp_path: Path) -> None:
    out = write_dataset_folders(tmp_path / "photos", n_ok=3, n_ng=9, seed=0, size=SIZE)

    assert out == tmp_path / "photos"
    assert sorted(p.name for p in (out / "ok").iterdir()) == ["ok_0000.png", "ok_0001.png", "ok_0002.png"]
    assert sorted(p.name for p in (out / "ng").iterdir()) == sorted(DEFECT_KINDS)
    per_kind = {kind: sorted((out / "ng" / kind).glob("*.png")) for kind in DEFECT_KINDS}
    assert sorted(len(v) for v in per_kind.values()) == [2, 2, 2, 3]  # 9 spread evenly over 4 kinds
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]  # no temporary folder left behind

    for kind, pngs in per_kind.items():
        for png in pngs:
            assert png.stem.startswith(f"{kind}_")
            with Image.open(png) as image:
                assert image.mode == "RGB" and image.size == (SIZE, SIZE)
            sidecar = json.loads(png.with_suffix(".json").read_text(encoding="utf-8"))
            assert set(sidecar) == {"description", "defects"}
            assert sidecar["description"]
            [defect] = sidecar["defects"]
            assert defect["type"] == kind
            x0, y0, x1, y1 = defect["box"]
            assert all(isinstance(v, int) for v in defect["box"])
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_changes_its_box_and_nothing_else(kind: str) -> None:
    for seed in range(6):
        ok, ng, defects = _pair(seed, kind)
        [defect] = defects
        assert defect["type"] == kind
        x0, y0, x1, y1 = defect["box"]
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        diff = np.abs(ok - ng).max(axis=2)
        assert diff[y0:y1, x0:x1].max() >= 40, f"{kind} seed {seed}: defect barely visible in its box"
        # Blur spreads a defect by a pixel or two; beyond that the photo must equal its OK twin.
        around = np.ones_like(diff, dtype=bool)
        around[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = False
        assert diff[around].max() <= 3, f"{kind} seed {seed}: pixels changed outside the defect box"


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_still_visible_at_model_input_size(kind: str) -> None:
    """The demo's model sees 64 px: the smallest default defect must survive the shrink."""
    for seed in range(6):
        ok, ng, _ = _pair(seed, kind)
        small = [
            np.asarray(Image.fromarray(a.astype(np.uint8)).resize((64, 64), Image.BICUBIC), np.int16) for a in (ok, ng)
        ]
        assert np.abs(small[0] - small[1]).max() >= 40, f"{kind} seed {seed}"


def test_min_defect_frac_sets_defect_size() -> None:
    def mean_area(frac: float) -> float:
        areas = []
        for seed in range(8):
            _, defects = make_box_photo(np.random.default_rng(seed), "spot", 128, min_defect_frac=frac)
            x0, y0, x1, y1 = defects[0]["box"]
            areas.append((x1 - x0) * (y1 - y0))
        return float(np.mean(areas))

    assert mean_area(0.15) > 3 * mean_area(0.05)


def test_ok_photo_has_no_defects_but_has_dark_print() -> None:
    image, defects = make_box_photo(np.random.default_rng(3), None, 128)
    assert defects == []
    # The print is dark ink on the box: "any dark pixel on the box" must not mean NG.
    assert (np.asarray(image.convert("L")) < 60).sum() > 30


def test_descriptions_name_the_defect_and_its_place() -> None:
    assert describe_defect({"type": "spot", "location": "top left"}) == "a dark spot near the top left corner"
    assert describe_defect({"type": "stain", "location": "center"}) == "a yellowish stain in the center"
    assert "top right corner" in describe_defect({"type": "missing_corner", "location": "top right"})


def test_missing_corner_location_is_a_corner() -> None:
    for seed in range(8):
        _, defects = make_box_photo(np.random.default_rng(seed), "missing_corner", SIZE)
        assert defects[0]["location"] in {"top left", "top right", "bottom left", "bottom right"}


def test_bad_arguments_raise_data_error() -> None:
    with pytest.raises(DataError, match="'dent'.*spot") as info:
        make_box_photo(np.random.default_rng(0), "dent", size=8, min_defect_frac=0.9)
    assert "size" in str(info.value) and "min_defect_frac" in str(info.value)  # every problem at once


def test_existing_output_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    with pytest.raises(OutputExistsError, match="photos"):
        write_dataset_folders(tmp_path / "photos", n_ok=1, n_ng=1, seed=0, size=SIZE)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_coverage_lies_in_its_box_and_matches_the_photo(kind: str) -> None:
    """The pixel coverage the demo's vision tower learns from: inside the defect's box, nonzero, and the
    photo is the one make_box_photo draws from the same seed."""
    image, defects, coverage = render_box_photo(np.random.default_rng(3), kind, 128, 0.14, station=True)
    same, _ = make_box_photo(np.random.default_rng(3), kind, 128, 0.14, station=True)
    assert np.array_equal(np.asarray(image), np.asarray(same))
    assert coverage is not None and coverage.shape == (128, 128) and coverage.max() > 0.5
    x0, y0, x1, y1 = defects[0]["box"]
    outside = coverage.copy()
    outside[y0:y1, x0:x1] = 0
    assert outside.max() == 0
    assert render_box_photo(np.random.default_rng(3), None, 128)[2] is None


@pytest.mark.parametrize(("frac", "station", "least"), [(0.06, False, 10), (0.14, True, 40)])
def test_every_defect_shows_against_its_clean_twin(frac: float, station: bool, least: int) -> None:
    """An NG label on a defect the camera cannot see (a spot inked onto barcode bars) would be wrong: every
    defect must change a fair number of photo pixels clearly (measured over these seeds: at least 17 and 81)."""
    for seed in range(12):
        for kind in DEFECT_KINDS:
            ok = make_box_photo(np.random.default_rng(seed), None, 128, frac, station)[0]
            ng = make_box_photo(np.random.default_rng(seed), kind, 128, frac, station)[0]
            diff = np.abs(np.asarray(ng, np.int16) - np.asarray(ok, np.int16)).max(axis=2)
            assert (diff >= 30).sum() >= least, f"{kind} seed {seed}: defect barely shows"


def test_a_defect_hidden_in_the_print_is_redrawn_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator checks what shows, not what it meant to draw: a drawer that changes nothing is refused."""

    def invisible(rng, image, background, face, zones, min_frac):
        mask = Image.new("L", image.size, 0)
        mask.paste(255, (10, 10, 30, 30))  # drawn here, but the photo is unchanged: as ink on ink
        return image.copy(), mask, "center"

    monkeypatch.setitem(synthetic._DRAWERS, "spot", invisible)
    with pytest.raises(DataError, match="hidden"):
        make_box_photo(np.random.default_rng(0), "spot", 128)


def test_defect_coverage_counts_only_what_shows() -> None:
    """The demo's tower learns from coverage: where the photo visibly changed, not where the mark was drawn."""
    for seed in range(6):
        ok = make_box_photo(np.random.default_rng(seed), None, 128, 0.14, station=True)[0]
        ng, _, coverage = render_box_photo(np.random.default_rng(seed), "scratch", 128, 0.14, station=True)
        diff = np.abs(np.asarray(ng, np.int16) - np.asarray(ok, np.int16)).max(axis=2)
        assert diff[coverage > 0.5].min() >= 10, f"seed {seed}: coverage where the photo barely changed"

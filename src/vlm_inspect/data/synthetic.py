"""Seeded synthetic photos of white product boxes, OK and NG, for the demo and for tests.

Each photo shows one white box (printed face, a visible side, a cast shadow) on a varied background, under a
lighting gradient, with camera blur and noise. NG photos carry one defect at a known place, so the folder writer
can put a sidecar with the defect's pixel box next to each NG photo. Photos are rendered at twice the asked size
and shrunk, which anti-aliases the edges that ImageDraw draws hard.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlm_inspect.errors import DataError, OutputExistsError

DEFECT_KINDS: tuple[str, ...] = ("spot", "scratch", "missing_corner", "stain")
"""Defect types the generator draws; also the names of the `ng/<defect>/` folders."""

SUPERSAMPLE = 2
"""Render at this multiple of the asked size, then shrink: smooth edges without per-pixel work."""

Point = tuple[float, float]


@dataclass(frozen=True)
class _Face:
    """The printed face of the box as an image quad; (u, v) in [0, 1]² map onto it bilinearly."""

    top_left: np.ndarray
    top_right: np.ndarray
    bottom_right: np.ndarray
    bottom_left: np.ndarray
    width: float  # length of the u side in render pixels, for sizing prints and defects
    height: float

    def at(self, u: float, v: float) -> Point:
        """The render-pixel position of face point (u, v)."""
        top = self.top_left + (self.top_right - self.top_left) * u
        bottom = self.bottom_left + (self.bottom_right - self.bottom_left) * u
        p = top + (bottom - top) * v
        return float(p[0]), float(p[1])

    def poly(self, uvs: list[Point]) -> list[Point]:
        """Render-pixel polygon of a polygon given in face coordinates."""
        return [self.at(u, v) for u, v in uvs]

    def corners(self) -> list[np.ndarray]:
        return [self.top_left, self.top_right, self.bottom_right, self.bottom_left]


# ---------------------------------------------------------------- public API


def make_box_photo(
    rng: np.random.Generator,
    defect: str | None,
    size: int = 128,
    min_defect_frac: float = 0.06,
    station: bool = False,
) -> tuple[Image.Image, list[dict]]:
    """Render one photo of a white product box, with one defect or none.

    The scene (background, box pose, print, light, noise) is drawn from random streams taken from `rng` before
    the defect is, so the same `rng` state with `defect=None` gives the same photo without the defect.

    Args:
        rng: Source of all randomness; the photo is a pure function of its state and the other arguments.
        defect: One of `DEFECT_KINDS`, or None for an OK box.
        size: Width and height of the square photo in pixels.
        min_defect_frac: Smallest defect size as a share of the box's mean side; sizes reach 2.5 times this.
            At the demo model's 64 px input a box spans about 35 px, so 0.06 keeps the smallest spot ~2 px wide.
        station: Photos as an inspection station takes them: fixed camera over a dark belt, the box in roughly
            the same place and pose, one product print, steady light. False varies the whole scene.

    Returns:
        The RGB photo and its defects: `[{"type": kind, "box": [x0, y0, x1, y1], "location": word}]` with
        integer pixel edges (x1 and y1 exclusive, as PIL's crop) and a 3×3 location on the box's face
        ("top left" ... "bottom right"); empty for an OK box.

    Raises:
        DataError: `defect` is not a known kind, or the sizes are out of range.
    """
    image, defects, _ = render_box_photo(rng, defect, size, min_defect_frac, station)
    return image, defects


def render_box_photo(
    rng: np.random.Generator,
    defect: str | None,
    size: int = 128,
    min_defect_frac: float = 0.06,
    station: bool = False,
) -> tuple[Image.Image, list[dict], np.ndarray | None]:
    """`make_box_photo`, plus where the defect lies pixel by pixel: (size, size) float32 in [0, 1], the share
    of each photo pixel the defect visibly changes (None for an OK box). A box around a thin diagonal scratch
    is mostly clean surface, and a scratch's stretch across black ink changes little; this is what the demo's
    vision tower learns from."""
    _check_args(defect, size, min_defect_frac)
    scene_rng, noise_rng, defect_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=3))
    n = size * SUPERSAMPLE

    background = _background(scene_rng, n, station)
    face, depth = _box_pose(scene_rng, n, station)
    background = _cast_shadow(scene_rng, background, face, depth)
    image = Image.fromarray(background)
    _draw_box(scene_rng, image, face, depth)
    print_zones = _draw_print(scene_rng, image, face, station)
    light = _lighting(scene_rng, size, station)

    defects: list[dict] = []
    coverage = None
    if defect is not None:
        drawn = _draw_visible_defect(defect_rng, defect, image, background, face, print_zones, min_defect_frac)
        image, mask, location, visible = drawn
        defects.append({"type": defect, "box": _mask_box(mask, size), "location": location})
        coverage = np.asarray(visible.resize((size, size), Image.Resampling.BOX), np.float32) / 255

    return _camera(noise_rng, image, light, size), defects, coverage


def describe_defect(defect: dict) -> str:
    """A short English description of one defect, as a person would write it, e.g. 'a dark spot near the top left corner'."""
    place = _PLACE_PHRASES[defect["location"]]
    if defect["type"] == "missing_corner":
        return f"a missing or dented piece at the {defect['location']} corner"
    return f"{_NOUNS[defect['type']]} {place}"


def write_dataset_folders(
    out: Path,
    n_ok: int,
    n_ng: int,
    seed: int,
    size: int = 128,
    min_defect_frac: float = 0.06,
    station: bool = False,
) -> Path:
    """Write synthetic OK and NG photos in the class-folder layout that `vlm-inspect prepare` reads.

    Layout: `out/ok/ok_0000.png ...` and `out/ng/<defect>/<defect>_0000.png ...` with defect kinds spread evenly,
    each NG photo with a sidecar `<stem>.json` = `{"description": ..., "defects": [{"type", "box"}]}`. Photo i of a
    class depends only on (seed, class, i), so the same call writes the same bytes. The folder is built under a
    temporary sibling and renamed into place, so an interrupted run leaves no complete-looking folder.

    Args:
        out: Folder to create; must not exist.
        n_ok: Number of OK photos.
        n_ng: Number of NG photos, spread over `DEFECT_KINDS` in turn.
        seed: Seed for every photo.
        size: Photo width and height in pixels.
        min_defect_frac: Smallest defect size as a share of the box's mean side (see `make_box_photo`).
        station: Inspection-station photos (see `make_box_photo`).

    Returns:
        `out`.

    Raises:
        OutputExistsError: `out` already exists.
        DataError: Counts or sizes are out of range.
    """
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"{out}: already exists; choose another folder or remove it")
    problems = [f"{name} must be >= 0, got {value}" for name, value in (("n_ok", n_ok), ("n_ng", n_ng)) if value < 0]
    if problems:
        raise DataError(f"cannot write synthetic photos to {out}: " + "; ".join(problems))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_ok(tmp, n_ok, seed, size, station)
        _write_ng(tmp, n_ng, seed, size, min_defect_frac, station)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------- folders


def _photo_rng(seed: int, label: str, index: int) -> np.random.Generator:
    # Keyed by (seed, class, index): adding photos never changes the ones already made.
    return np.random.default_rng([seed, sum(label.encode()), len(label), index])


def _write_ok(root: Path, n_ok: int, seed: int, size: int, station: bool) -> None:
    folder = root / "ok"
    folder.mkdir()
    for i in range(n_ok):
        image, _ = make_box_photo(_photo_rng(seed, "ok", i), None, size, station=station)
        image.save(folder / f"ok_{i:04d}.png")


def _write_ng(root: Path, n_ng: int, seed: int, size: int, min_defect_frac: float, station: bool) -> None:
    counts = dict.fromkeys(DEFECT_KINDS, 0)
    for i in range(n_ng):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        folder = root / "ng" / kind
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{kind}_{counts[kind]:04d}"
        image, defects = make_box_photo(_photo_rng(seed, kind, counts[kind]), kind, size, min_defect_frac, station)
        image.save(folder / f"{stem}.png")
        sidecar = {
            "description": "; ".join(describe_defect(d) for d in defects),
            "defects": [{"type": d["type"], "box": d["box"]} for d in defects],
        }
        (folder / f"{stem}.json").write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
        counts[kind] += 1


def _check_args(defect: str | None, size: int, min_defect_frac: float) -> None:
    problems = []
    if defect is not None and defect not in DEFECT_KINDS:
        problems.append(f"defect {defect!r} is not one of {', '.join(DEFECT_KINDS)}")
    if size < 32:
        problems.append(f"size must be >= 32 pixels, got {size}")
    if not 0.01 <= min_defect_frac <= 0.3:
        problems.append(f"min_defect_frac must be in [0.01, 0.3], got {min_defect_frac}")
    if problems:
        raise DataError("cannot render a synthetic box photo: " + "; ".join(problems))


# ---------------------------------------------------------------- scene


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], n×n: a small random grid blown up bicubically."""
    grid = rng.uniform(0, 255, size=(cells, cells)).astype(np.uint8)
    big = np.asarray(Image.fromarray(grid).resize((n, n), Image.BICUBIC), dtype=np.float32)
    return big / 127.5 - 1.0


def _background(rng: np.random.Generator, n: int, station: bool = False) -> np.ndarray:
    kind = rng.choice(["dark", "grey", "wood", "table"], p=[0.25, 0.25, 0.3, 0.2])
    kind = "dark" if station else kind  # a station's belt
    if kind == "wood":
        base = np.array([rng.uniform(120, 175), rng.uniform(80, 115), rng.uniform(45, 70)], np.float32)
        # Grain: noise stretched along one axis (long streaks), plus a few broad rings.
        streaks = np.asarray(
            Image.fromarray(rng.uniform(0, 255, size=(48, 3)).astype(np.uint8)).resize((n, n), Image.BICUBIC),
            np.float32,
        )
        streaks = streaks / 127.5 - 1.0
        if rng.uniform() < 0.5:
            streaks = streaks.T
        shade = 1.0 + 0.1 * streaks + 0.05 * _smooth_noise(rng, n, 4)
    else:
        level = {"dark": (25, 70), "grey": (90, 150), "table": (150, 195)}[kind]
        tint = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
        base = rng.uniform(*level) * tint
        shade = 1.0 + 0.08 * _smooth_noise(rng, n, 5)
    texture = 0.02 * rng.standard_normal(size=(n, n), dtype=np.float32)  # fabric/wood fibre, before camera noise
    return np.clip(base * (shade + texture)[..., None], 0, 255).astype(np.uint8)


def _box_pose(rng: np.random.Generator, n: int, station: bool = False) -> tuple[_Face, np.ndarray]:
    """Where the printed face lies, and the image offset of the box's bottom edge (the visible side's depth)."""
    # A station's fixture holds the box nearly in place: same size, small shifts and turns.
    width = rng.uniform(0.64, 0.68) * n if station else rng.uniform(0.45, 0.68) * n
    height = width * (rng.uniform(0.74, 0.78) if station else rng.uniform(0.6, 0.95))
    keystone = rng.uniform(-0.06, 0.06) * (0.2 if station else 1)  # slight perspective: one end drawn narrower
    half_w, half_h = width / 2, height / 2
    local = np.array(
        [
            [-half_w * (1 - keystone), -half_h],
            [half_w * (1 - keystone), -half_h],
            [half_w * (1 + keystone), half_h],
            [-half_w * (1 + keystone), half_h],
        ]
    )
    angle = np.deg2rad(rng.uniform(-3, 3) if station else rng.uniform(-15, 15))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = local @ rotation.T
    depth = np.array([rng.uniform(-0.06, 0.06), rng.uniform(0.05, 0.13)]) * width
    # Keep the whole box (face and side) inside the photo with a margin.
    extent = np.vstack([corners, corners + depth])
    low, high = -extent.min(axis=0) + 0.04 * n, n - extent.max(axis=0) - 0.04 * n
    middle = (low + np.maximum(high, low + 1e-3)) / 2
    spread = (np.maximum(high, low + 1e-3) - low) / 2 * (0.25 if station else 1)
    centre = rng.uniform(middle - spread, middle + spread)
    corners = corners + centre
    return _Face(*corners, width=width, height=height), depth


def _cast_shadow(rng: np.random.Generator, background: np.ndarray, face: _Face, depth: np.ndarray) -> np.ndarray:
    n = background.shape[0]
    offset = depth + rng.uniform(-0.04, 0.04, size=2) * n
    mask = Image.new("L", (n, n), 0)
    corners = face.corners()
    ImageDraw.Draw(mask).polygon(_hull_points([*(c + offset for c in corners), *corners]), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(n * rng.uniform(0.015, 0.04)))
    darkness = rng.uniform(0.3, 0.55) * np.asarray(mask, np.float32)[..., None] / 255
    return (background * (1 - darkness)).astype(np.uint8)


def _hull_points(points: list[np.ndarray]) -> list[Point]:
    """Convex hull (monotone chain) of a few points."""
    pts = sorted({(float(p[0]), float(p[1])) for p in points})

    def half(seq: list[Point]) -> list[Point]:
        chain: list[Point] = []
        for p in seq:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return half(pts) + half(pts[::-1])


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _draw_box(rng: np.random.Generator, image: Image.Image, face: _Face, depth: np.ndarray) -> None:
    """Sides first (only those facing the camera show past the face), then the face with a faint card texture."""
    white = np.array([rng.uniform(228, 250)] * 3) * rng.uniform(0.98, 1.02, size=3)
    draw = ImageDraw.Draw(image)
    corners = face.corners()
    centre = sum(corners) / 4
    edges = [(corners[i], corners[(i + 1) % 4]) for i in range(4)]
    for a, b in sorted(edges, key=lambda e: float(np.dot((e[0] + e[1]) / 2 - centre, depth))):
        outward = (a + b) / 2 - centre
        facing = float(np.dot(outward, depth) / (np.linalg.norm(outward) * np.linalg.norm(depth)))
        shade = 0.62 + 0.18 * max(facing, 0) + rng.uniform(-0.04, 0.04)
        draw.polygon([tuple(a), tuple(b), tuple(b + depth), tuple(a + depth)], fill=_rgb(white * shade))
    draw.polygon([tuple(c) for c in corners], fill=_rgb(white))
    # A thin darker rim where the face meets the sides: the box edge the eye uses to read it as 3-D.
    draw.line([tuple(c) for c in (*corners, corners[0])], fill=_rgb(white * 0.85), width=1)


def _rgb(color: np.ndarray | tuple[float, ...]) -> tuple[int, int, int]:
    c = np.clip(np.asarray(color, dtype=np.float64), 0, 255)
    return int(c[0]), int(c[1]), int(c[2])


_INKS = [(30, 45, 120), (170, 30, 35), (25, 25, 25), (20, 110, 60)]


def _draw_print(
    rng: np.random.Generator, image: Image.Image, face: _Face, station: bool = False
) -> list[tuple[float, float, float, float]]:
    """The product's print: one design (logo, name, text lines, barcode) with small placement jitter.

    A factory inspects one product, so the print keeps its layout; its dark ink is why "dark pixels" alone
    cannot mean NG. Returns the printed zones as (u0, v0, u1, v1) so defects can avoid hiding in the ink.
    """
    draw = ImageDraw.Draw(image)
    ink = _INKS[int(rng.integers(len(_INKS)))]
    ink = _INKS[0] if station else ink  # a station inspects one product
    du, dv = rng.uniform(-0.03, 0.03, size=2)
    zones = []

    # Logo: a filled disc with a white stripe through it, top left.
    cu, cv, r = 0.2 + du, 0.27 + dv, 0.1
    draw.polygon(face.poly(_ellipse_uv(cu, cv, r * face.height / face.width, r, 20)), fill=ink)
    draw.polygon(
        face.poly([(cu - 0.1, cv - 0.015), (cu + 0.1, cv - 0.015), (cu + 0.1, cv + 0.015), (cu - 0.1, cv + 0.015)]),
        fill=(245, 245, 245),
    )
    zones.append((cu - 0.13, cv - 0.14, cu + 0.13, cv + 0.14))

    # Product name (a thick bar) and three grey text lines of varied length, right of the logo.
    name_len = rng.uniform(0.3, 0.45)
    zones.append(_print_bar(draw, face, 0.37 + du, 0.2 + dv, name_len, 0.07, ink))
    for k in range(3):
        length = rng.uniform(0.25, 0.48)
        zones.append(_print_bar(draw, face, 0.37 + du, 0.36 + dv + 0.08 * k, length, 0.03, (90, 90, 95)))

    # Barcode: thin vertical bars bottom right.
    u = 0.66 + du
    for width in rng.choice([0.008, 0.014, 0.022], size=12):
        draw.polygon(face.poly(_rect_uv(u, 0.7 + dv, width, 0.16)), fill=(25, 25, 25))
        u += width + rng.choice([0.008, 0.014])
    zones.append((0.64 + du, 0.68 + dv, u + 0.02, 0.88 + dv))
    return zones


def _print_bar(
    draw: ImageDraw.ImageDraw, face: _Face, u: float, v: float, length: float, thick: float, ink: tuple
) -> tuple:
    draw.polygon(face.poly(_rect_uv(u, v, length, thick)), fill=ink)
    return (u - 0.02, v - 0.03, u + length + 0.02, v + thick + 0.03)


def _rect_uv(u: float, v: float, w: float, h: float) -> list[Point]:
    return [(u, v), (u + w, v), (u + w, v + h), (u, v + h)]


def _ellipse_uv(cu: float, cv: float, ru: float, rv: float, k: int, wobble: np.ndarray | None = None) -> list[Point]:
    angles = np.linspace(0, 2 * np.pi, k, endpoint=False)
    scale = np.ones(k) if wobble is None else wobble
    return [(cu + ru * s * np.cos(a), cv + rv * s * np.sin(a)) for a, s in zip(angles, scale, strict=True)]


def _lighting(rng: np.random.Generator, n: int, station: bool = False) -> np.ndarray:
    """A multiplicative light field: a linear gradient in a random direction, a soft vignette, a colour cast."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    gradient = 1.0 + rng.uniform(0.05, 0.25) * (xx * np.cos(angle) + yy * np.sin(angle)) * 2
    vignette = 1.0 - rng.uniform(0.0, 0.25) * (xx**2 + yy**2) * 2
    level = rng.uniform(0.8, 1.05)
    if station:  # controlled light: the gradient and vignette mostly flattened
        gradient, vignette, level = 1 + (gradient - 1) * 0.3, 1 + (vignette - 1) * 0.3, 0.95
    cast = rng.uniform(0.96, 1.04, size=3).astype(np.float32)
    return (level * gradient * vignette)[..., None] * cast


def _camera(rng: np.random.Generator, image: Image.Image, light: np.ndarray, size: int) -> Image.Image:
    """Shrink to the photo size, light it, blur it a little and add sensor noise.

    The light field is smooth, so applying it after the shrink gives the same photo for a quarter of the work.
    """
    small = np.asarray(image.resize((size, size), Image.BOX), np.float32) * light
    small = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.2, 0.7))
    )
    noisy = np.asarray(small, np.float32) + rng.normal(0, rng.uniform(1.5, 5.0), size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- defects
# Each drawer returns the changed image, an L mask of the changed render pixels (for the tight pixel box), and a
# 3×3 location word on the face.

_Drawn = tuple[Image.Image, Image.Image, str]

_NOUNS = {"spot": "a dark spot", "scratch": "a scratch", "stain": "a yellowish stain"}
_PLACE_PHRASES = {
    "top left": "near the top left corner",
    "top": "near the top edge",
    "top right": "near the top right corner",
    "left": "near the left edge",
    "center": "in the center",
    "right": "near the right edge",
    "bottom left": "near the bottom left corner",
    "bottom": "near the bottom edge",
    "bottom right": "near the bottom right corner",
}


def _location_word(u: float, v: float) -> str:
    row = ("top", "", "bottom")[min(int(v * 3), 2)]
    col = ("left", "", "right")[min(int(u * 3), 2)]
    return " ".join(w for w in (row, col) if w) or "center"


def _defect_size(rng: np.random.Generator, face: _Face, min_frac: float) -> float:
    """Defect diameter in render pixels: log-uniform from min_frac to 2.5 × min_frac of the box's mean side."""
    frac = min_frac * np.exp(rng.uniform(0, np.log(2.5)))
    return float(frac * (face.width + face.height) / 2)


def _to_face_units(face: _Face, pixels: float) -> float:
    return pixels / ((face.width + face.height) / 2)


def _free_spot(rng: np.random.Generator, zones: list[tuple], margin: float, reach: float) -> tuple[float, float]:
    """A face point whose defect (reach: its half-size in face units) stays off the print and the edges.

    A defect hidden in black ink would be a wrong label. After 50 misses the last try is kept: a defect partly
    over the print is still a defect. A defect longer than most of the face (a long scratch) cannot keep off
    the edges: its centre stays within the middle fifth.
    """
    margin = min(max(margin, reach), 0.4)
    for _ in range(50):
        u, v = rng.uniform(margin, 1 - margin, size=2)
        if not any(u0 - reach <= u <= u1 + reach and v0 - reach <= v <= v1 + reach for u0, v0, u1, v1 in zones):
            return float(u), float(v)
    return float(u), float(v)


def _blend(image: Image.Image, mask: Image.Image, color: tuple, alpha: float) -> Image.Image:
    a = alpha * np.asarray(mask, np.float32)[..., None] / 255
    out = np.asarray(image, np.float32) * (1 - a) + np.array(color, np.float32) * a
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _blob(rng: np.random.Generator, face: _Face, u: float, v: float, diameter: float, n: int) -> Image.Image:
    """An irregular filled blob on the face, as an L mask."""
    ru, rv = diameter / 2 / face.width, diameter / 2 / face.height
    wobble = rng.uniform(0.65, 1.0, size=11)
    mask = Image.new("L", (n, n), 0)
    ImageDraw.Draw(mask).polygon(face.poly(_ellipse_uv(u, v, ru, rv * rng.uniform(0.7, 1.3), 11, wobble)), fill=255)
    return mask


def _draw_spot(
    rng: np.random.Generator,
    image: Image.Image,
    background: np.ndarray,
    face: _Face,
    zones: list[tuple],
    min_frac: float,
) -> _Drawn:
    diameter = _defect_size(rng, face, min_frac)
    u, v = _free_spot(rng, zones, 0.1, _to_face_units(face, diameter / 2))
    mask = _blob(rng, face, u, v, diameter, image.width).filter(ImageFilter.GaussianBlur(0.6))
    color = np.array([rng.uniform(35, 75)] * 3) * rng.uniform(0.85, 1.1, size=3)
    return _blend(image, mask, _rgb(color), rng.uniform(0.85, 1.0)), mask, _location_word(u, v)


def _draw_scratch(
    rng: np.random.Generator,
    image: Image.Image,
    background: np.ndarray,
    face: _Face,
    zones: list[tuple],
    min_frac: float,
) -> _Drawn:
    length = _defect_size(rng, face, min_frac) * rng.uniform(2.0, 3.0)
    u, v = _free_spot(rng, zones, 0.1, _to_face_units(face, length / 2))
    angle = rng.uniform(0, np.pi)
    steps = np.linspace(-0.5, 0.5, 5)
    bend = np.cumsum(rng.normal(0, 0.15, size=5))  # a scratch wanders a little
    pts = []
    for t, b in zip(steps, bend, strict=True):
        x = t * length * np.cos(angle) - b * length * 0.15 * np.sin(angle)
        y = t * length * np.sin(angle) + b * length * 0.15 * np.cos(angle)
        pts.append(
            face.at(float(np.clip(u + x / face.width, 0.03, 0.97)), float(np.clip(v + y / face.height, 0.03, 0.97)))
        )
    mask = Image.new("L", image.size, 0)
    # At least ~1.2 output pixels wide, so the scratch survives the shrink to the model's 64 px input.
    width = max(round(image.width / 64 * 1.2), round(length * 0.06))
    ImageDraw.Draw(mask).line(pts, fill=255, width=width, joint="curve")
    mask = mask.filter(ImageFilter.GaussianBlur(0.5))
    color = np.array([rng.uniform(40, 90)] * 3)
    return _blend(image, mask, _rgb(color), rng.uniform(0.8, 0.95)), mask, _location_word(u, v)


def _draw_stain(
    rng: np.random.Generator,
    image: Image.Image,
    background: np.ndarray,
    face: _Face,
    zones: list[tuple],
    min_frac: float,
) -> _Drawn:
    diameter = _defect_size(rng, face, min_frac) * rng.uniform(1.6, 2.2)  # stains are faint, so a bit larger
    u, v = _free_spot(rng, zones, 0.1, _to_face_units(face, diameter / 2))
    mask = _blob(rng, face, u, v, diameter, image.width).filter(ImageFilter.GaussianBlur(diameter * 0.08))
    color = (rng.uniform(150, 185), rng.uniform(105, 135), rng.uniform(40, 75))
    return _blend(image, mask, color, rng.uniform(0.45, 0.65)), mask, _location_word(u, v)


def _draw_missing_corner(
    rng: np.random.Generator,
    image: Image.Image,
    background: np.ndarray,
    face: _Face,
    zones: list[tuple],
    min_frac: float,
) -> _Drawn:
    """A corner torn away (background shows through, with a brown torn edge) or dented (a shaded crushed flap)."""
    corner_uv = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)][int(rng.integers(4))]
    reach = _defect_size(rng, face, min_frac) * rng.uniform(1.2, 2.0)
    su, sv = 1 - 2 * corner_uv[0], 1 - 2 * corner_uv[1]  # direction from the corner into the face
    ru, rv = reach / face.width * rng.uniform(0.7, 1.3), reach / face.height * rng.uniform(0.7, 1.3)
    # Torn edge: from a point on one side to a point on the other, with a few jagged steps between.
    ts = np.linspace(0, 1, 6)
    jag = np.concatenate([[0], rng.uniform(-0.15, 0.15, size=4), [0]])
    edge_uv = [
        (corner_uv[0] + su * ru * (1 - t + j), corner_uv[1] + sv * rv * (t + j)) for t, j in zip(ts, jag, strict=True)
    ]
    # Extend past the face so the cut also takes the matching bit of the sides.
    outside = (corner_uv[0] - su * 0.3, corner_uv[1] - sv * 0.3)
    cut_uv = [edge_uv[0], (outside[0], edge_uv[0][1]), outside, (edge_uv[-1][0], outside[1]), *edge_uv[::-1]]
    cut = Image.new("L", image.size, 0)
    ImageDraw.Draw(cut).polygon(face.poly(cut_uv), fill=255)
    before = np.asarray(image, np.int16)
    edge = face.poly(edge_uv)
    if rng.uniform() < 0.7:
        image = Image.composite(Image.fromarray(background), image, cut)
        ImageDraw.Draw(image).line(edge, fill=_rgb((rng.uniform(150, 190), 130, 90)), width=max(2, image.width // 100))
    else:
        flap = Image.new("L", image.size, 0)  # a dent stays on the face: shade only the crushed triangle
        ImageDraw.Draw(flap).polygon(face.poly([corner_uv, *edge_uv]), fill=255)
        image = _blend(image, flap, (0, 0, 0), rng.uniform(0.35, 0.5))
        ImageDraw.Draw(image).line(edge, fill=(70, 70, 70), width=max(2, image.width // 100))
    changed = np.abs(np.asarray(image, np.int16) - before).max(axis=2) > 6
    mask = Image.fromarray((changed * 255).astype(np.uint8))
    return image, mask, _location_word(*corner_uv)


_DRAWERS: dict[str, Callable[..., _Drawn]] = {
    "spot": _draw_spot,
    "scratch": _draw_scratch,
    "missing_corner": _draw_missing_corner,
    "stain": _draw_stain,
}

VISIBLE_CONTRAST = 40
"""Levels (0-255) by which a render pixel must change, in some channel, for the defect to show there."""
MIN_VISIBLE_SHARE = 0.25
"""Least share of a defect's drawn pixels that must show: a spot inked onto black barcode bars changes almost
nothing, and an NG label on it would be wrong. Measured over 4,800 defects at 0.03-0.14 sizes: at least 0.32
(a long scratch across the print), spots 0.7."""
_DRAW_TRIES = 20


def _draw_visible_defect(
    rng: np.random.Generator,
    kind: str,
    image: Image.Image,
    background: np.ndarray,
    face: _Face,
    zones: list[tuple],
    min_frac: float,
) -> tuple[Image.Image, Image.Image, str, Image.Image]:
    """Draw the defect, again elsewhere while too little of it shows; also return its visible pixels (L mask).

    Raises:
        DataError: No try showed enough (fail rather than mislabel).
    """
    before = np.asarray(image, np.int16)
    for _ in range(_DRAW_TRIES):
        drawn, mask, location = _DRAWERS[kind](rng, image, background, face, zones, min_frac)
        visible = np.abs(np.asarray(drawn, np.int16) - before).max(axis=2) >= VISIBLE_CONTRAST
        if visible.sum() >= MIN_VISIBLE_SHARE * (np.asarray(mask) > 40).sum():  # as _mask_box counts pixels
            return drawn, mask, location, Image.fromarray((visible * 255).astype(np.uint8))
    raise DataError(f"synthetic {kind} stayed hidden in the print after {_DRAW_TRIES} tries")


def _mask_box(mask: Image.Image, size: int) -> list[int]:
    """Tight box of the mask's visible pixels in output pixels: [x0, y0, x1, y1], x1/y1 exclusive."""
    visible = np.asarray(mask) > 40
    ys, xs = np.nonzero(visible)
    if xs.size == 0:  # cannot happen with the sizes allowed; fail loudly rather than write a wrong label
        raise DataError("synthetic defect drew no visible pixels")
    x0, x1 = xs.min() // SUPERSAMPLE, -(-(xs.max() + 1) // SUPERSAMPLE)
    y0, y1 = ys.min() // SUPERSAMPLE, -(-(ys.max() + 1) // SUPERSAMPLE)
    return [int(max(x0, 0)), int(max(y0, 0)), int(min(x1, size)), int(min(y1, size))]

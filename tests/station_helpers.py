"""Shared by the station tests: a throwaway PostgreSQL server, photos, and a fake model for the hot folder."""

from __future__ import annotations

import glob
import io
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

from vlm_inspect.data.reference import NO_REFERENCE
from vlm_inspect.inference import Answer

PG_URL_ENV = "VLM_INSPECT_TEST_PG_URL"
"""A PostgreSQL URL to test against instead of starting a throwaway server (e.g. one .ci/run started)."""


def photo(shade: int = 230, size: tuple[int, int] = (96, 72), spot: bool = False, fmt: str = "PNG") -> bytes:
    """A light box photo; `spot` adds a dark defect in the top left third."""
    image = Image.new("RGB", size, (shade, shade, shade))
    if spot:
        w, h = size
        ImageDraw.Draw(image).ellipse((w * 0.06, h * 0.08, w * 0.25, h * 0.28), fill=(10, 10, 10))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


class DarknessModel:
    """Stands in for `Predictor` in the hot folder: p(NG) is how dark the photo is; counts every photo scored and
    keeps the references each batch was judged against (`judged`, as given: None is the model's own)."""

    name = "darkness"
    product = "box"

    def __init__(self, reference=NO_REFERENCE) -> None:
        self.scored = 0
        self.reference = reference
        self.judged: list = []

    def reference_for(self, reference=None):
        return self.reference if reference is None else reference

    def score(self, images, question=None, batch_size=8, reference=None):
        self.scored += len(images)
        self.judged.append(reference)
        return [1.0 - sum(img.convert("L").getdata()) / (255.0 * img.width * img.height) for img in images]

    def describe(self, images, question=None, max_new_tokens=64, batch_size=8, reference=None):
        return ["a dark photo"] * len(images)

    def answers(self, images, question=None, max_new_tokens=64, batch_size=8, reference=None):
        return [Answer(text, [], 0) for text in self.describe(images, question, max_new_tokens, batch_size)]

    def locate(self, images, max_new_tokens=64, batch_size=8, reference=None):
        """A box over the darkest quarter: the top left one, in the photo's pixels."""
        return [Answer(None, [{"type": "dark", "box": [0.0, 0.0, img.width / 2, img.height / 2]}], 1) for img in images]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str | None]:
    """A PostgreSQL URL: the one in $VLM_INSPECT_TEST_PG_URL, else a throwaway cluster; None (with a reason) if neither.

    The cluster runs as the `postgres` user when this process is root (PostgreSQL refuses root), in a
    temporary folder, listening on a Unix socket only; it is stopped and removed afterwards.
    """
    if os.environ.get(PG_URL_ENV):
        yield os.environ[PG_URL_ENV]
        return
    bindir = _pg_bin()
    if bindir is None:
        yield None
        return
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="vlm-pg-"))
    data, port = root / "data", _free_port()
    if as_user:
        shutil.chown(root, "postgres")
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-k {root} -p {port} -c listen_addresses='' -c fsync=off"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l", str(root / "log"), "start")
        run(str(bindir / "createdb"), "-h", str(root), "-p", str(port), "-U", "postgres", "station")
        yield f"postgresql+psycopg://postgres@/station?host={root}&port={port}"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def reset_postgres(url: str) -> None:
    """Drop every station table so each test starts from an empty, unmigrated database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(
            text(
                "DROP TABLE IF EXISTS golden_sets, claims, baselines, reviews, inspections, photos, alembic_version CASCADE"
            )
        )
    engine.dispose()

"""Every verb on every model family: the real CLI with each family's tiny model swapped in (torchtune's habit).

Per family: `tiny-model --family` builds it offline; `train` (LoRA) lowers the loss and changes only adapter
and projector weights; with the adapter off the logits are the base's; `merge` passes its own logit check
and the merged folder answers like the adapter; batched scores equal one-by-one scores; a fully trained
tiny model's described verdict agrees with its score; `predict`, `evaluate` and `serve` answer. With a known-good
reference shown first (#26): `train` keeps it in the run, batched scores equal one-by-one scores, and `predict` and
`serve` judge against it and say so.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlm_inspect.cli import app
from vlm_inspect.config import ModelSettings
from vlm_inspect.models.families import all_families

LOOPBACK = "http://127.0.0.1:8000"  # serve answers only loopback Host names on a loopback bind

pytestmark = pytest.mark.integration
FAMILIES = [f.name for f in all_families()]
# Small LoRA, high learning rates and a small image-token budget: seconds per run on a CPU.
FAST = ["lora_r=8", "lora_alpha=16", "lr=1e-2", "projector_lr=2e-3", "augment=false", "image_max_tokens=64"]
runner = CliRunner()


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory: pytest.TempPathFactory, spot_dataset: Path) -> tuple[str, Path, Path]:
    """(family, tiny model folder, LoRA run folder)."""
    root = tmp_path_factory.mktemp(request.param)
    cli("tiny-model", str(root / "model"), "--family", request.param)
    run = root / "run"
    cli("train", "--model", str(root / "model"), "--data", str(spot_dataset), "--out", str(run), "min_steps=40", *FAST)
    return request.param, root / "model", run


@pytest.fixture(scope="module")
def photos(spot_dataset: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((spot_dataset / "images").glob("*.png"))[:6]]


def test_tiny_model_is_the_family_it_says(family_run):
    name, model, _ = family_run
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] in next(f for f in all_families() if f.name == name).model_types
    assert (model / "chat_template.jinja").exists() or "chat_template" in (model / "processor_config.json").read_text()


def test_train_lowers_the_loss_and_saves_the_budget(family_run):
    _, _, run = family_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) < 0.9 * sum(losses[:5])
    assert "image_max_tokens: 64" in (run / "config.yaml").read_text()


def test_adapter_changes_lora_and_projector_and_off_is_the_base(family_run, photos):
    from vlm_inspect.inference import Predictor
    from vlm_inspect.models.chat import prompt
    from vlm_inspect.models.families import family_named

    name, model, run = family_run
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    assert any(family_named(name).projector in k for k in adapter)  # the projector trained beside LoRA
    tuned = Predictor.load(ModelSettings(model=model, adapter=run, device="cpu"))
    base = Predictor.load(ModelSettings(model=model, device="cpu", image_max_tokens=64))
    inputs = tuned._inputs(photos[:2], [prompt(tuned.processor, "Is this box OK or NG?")] * 2)
    with torch.no_grad(), tuned.adapter_disabled():
        off = tuned.model(**inputs).logits
    with torch.no_grad():
        assert torch.equal(off, base.model(**inputs).logits)
        assert not torch.allclose(off, tuned.model(**inputs).logits)


def test_batched_scores_equal_one_by_one(family_run, photos):
    from vlm_inspect.inference import Predictor

    _, model, run = family_run
    predictor = Predictor.load(ModelSettings(model=model, adapter=run, device="cpu"))
    batched = predictor.score(photos, "Is this box OK or NG?", batch_size=6)
    assert [predictor.score([im], "Is this box OK or NG?")[0] for im in photos] == pytest.approx(batched, abs=1e-5)


def test_merge_answers_like_the_adapter(family_run, photos, tmp_path: Path):
    from vlm_inspect.inference import Predictor

    _, model, run = family_run
    out = tmp_path / "merged"
    cli("merge", "--model", str(model), "--adapter", str(run), "--out", str(out), "--dtype", "fp32")
    merged = Predictor.load(ModelSettings(model=out, device="cpu"))
    tuned = Predictor.load(ModelSettings(model=model, adapter=run, device="cpu"))
    assert merged.processor.image_processor.to_dict() == tuned.processor.image_processor.to_dict()
    assert merged.score(photos, "Is this box OK or NG?") == pytest.approx(
        tuned.score(photos, "Is this box OK or NG?"), abs=1e-4
    )


def test_predict_evaluate_and_serve_answer(family_run, spot_dataset: Path, tmp_path: Path):
    from fastapi.testclient import TestClient

    from vlm_inspect.config import ModelSettings, ServeConfig
    from vlm_inspect.inference import Predictor
    from vlm_inspect.service.app import create_app

    _, model, run = family_run
    preds = tmp_path / "p.jsonl"
    cli(
        "predict",
        str(spot_dataset / "images"),
        "--model",
        str(model),
        "--adapter",
        str(run),
        "--out",
        str(preds),
        "--describe",
    )
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 16 and all(r["verdict"] in ("OK", "NG") and "description" in r for r in rows)
    report = tmp_path / "report"
    cli("evaluate", "--model", str(model), "--adapter", str(run), "--data", str(spot_dataset), "--out", str(report))
    results = json.loads((report / "results.json").read_text())
    assert results["comparison"][0]["view"]["family"] == family_run[0]
    photo = (spot_dataset / "images" / "001.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(photo).decode()
    chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]}
    with TestClient(
        create_app(
            Predictor.load(ModelSettings(model=model, adapter=run, device="cpu")), ServeConfig(model=str(model))
        ),
        base_url=LOOPBACK,
    ) as client:
        answer = client.post("/v1/inspect", files={"file": ("a.png", photo, "image/png")}).json()
        assert answer["verdict"] in ("OK", "NG") and 0 <= answer["p_ng"] <= 1
        reply = client.post("/v1/chat/completions", json={**chat, "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None


@pytest.fixture(scope="module", params=FAMILIES)
def reference_run(request, tmp_path_factory: pytest.TempPathFactory, reference_dataset: Path) -> tuple[str, Path, Path]:
    """(family, tiny model folder, LoRA run trained with a known-good reference before every photo)."""
    root = tmp_path_factory.mktemp(f"ref-{request.param}")
    cli("tiny-model", str(root / "model"), "--family", request.param)
    run = root / "run"
    cli(
        "train",
        "--model",
        str(root / "model"),
        "--data",
        str(reference_dataset),
        "--out",
        str(run),
        "min_steps=8",
        *FAST,
    )
    return request.param, root / "model", run


def test_train_with_a_reference_keeps_it_in_the_run(reference_run, reference_dataset: Path):
    _, _, run = reference_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 8 and all(r["loss"] == r["loss"] for r in rows if "loss" in r)
    kept = (run / "reference" / "reference.json").read_bytes()
    assert kept == (reference_dataset / "reference" / "reference.json").read_bytes()


def test_batched_scores_with_a_reference_equal_one_by_one(reference_run, photos):
    from vlm_inspect.inference import Predictor

    _, model, run = reference_run
    predictor = Predictor.load(ModelSettings(model=model, adapter=run, device="cpu"))
    assert predictor.reference.files == ("ref_01.png",)
    batched = predictor.score(photos, "Is this box OK or NG?", batch_size=6)
    assert [predictor.score([im], "Is this box OK or NG?")[0] for im in photos] == pytest.approx(batched, abs=1e-5)


def test_predict_and_serve_judge_against_the_runs_reference(reference_run, reference_dataset: Path, tmp_path: Path):
    from fastapi.testclient import TestClient

    from vlm_inspect.config import ServeConfig
    from vlm_inspect.inference import Predictor
    from vlm_inspect.service.app import create_app

    _, model, run = reference_run
    preds = tmp_path / "p.jsonl"
    cli(
        "predict",
        str(reference_dataset / "images"),
        "--model",
        str(model),
        "--adapter",
        str(run),
        "--out",
        str(preds),
        "--locate",
        "--max-new-tokens",
        "8",
    )
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 16 and all(r["reference"]["photos"][0]["file"] == "ref_01.png" for r in rows)
    photo = (reference_dataset / "images" / "001.png").read_bytes()
    predictor = Predictor.load(ModelSettings(model=model, adapter=run, device="cpu"))
    with TestClient(create_app(predictor, ServeConfig(model=str(model))), base_url=LOOPBACK) as client:
        judged = client.post("/v1/inspect", files={"file": ("a.png", photo, "image/png")}).json()
        alone = client.post("/v1/inspect", files={"file": ("a.png", photo, "image/png")}, data={"reference": "none"})
    assert judged["reference"]["name"] == "run" and 0 <= judged["p_ng"] <= 1
    assert alone.json()["reference"] is None and alone.json()["p_ng"] != judged["p_ng"]


@pytest.fixture(scope="module", params=FAMILIES)
def full_model(request, tmp_path_factory: pytest.TempPathFactory, spot_dataset: Path) -> Path:
    """All weights of the family's tiny model trained: it learns the answer format in a few dozen steps."""
    root = tmp_path_factory.mktemp(f"full-{request.param}")
    cli("tiny-model", str(root / "model"), "--family", request.param)
    args = ["method=full", "lr=3e-3", "projector_lr=3e-3", "min_steps=60", "augment=false", "image_max_tokens=64"]
    cli("train", "--model", str(root / "model"), "--data", str(spot_dataset), "--out", str(root / "run"), *args)
    return root / "run" / "model"


def test_described_verdict_agrees_with_the_score(full_model: Path, photos):
    from vlm_inspect.inference import Predictor

    predictor = Predictor.load(ModelSettings(model=full_model, device="cpu"))
    question = "Is this box OK or NG?"  # the spot dataset's training question
    p_ng = predictor.score(photos, question, batch_size=6)
    answers = predictor.describe(photos, question, max_new_tokens=3, batch_size=6)
    assert all(a.startswith(("OK", "NG")) for a in answers), answers  # it learned the answer format
    assert [p >= 0.5 for p in p_ng] == [a.startswith("NG") for a in answers], (p_ng, answers)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FAMILIES)
def test_qlora_keeps_each_familys_vision_tower_and_projector_unquantized(name: str, tmp_path: Path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")
    from vlm_inspect.config import TrainConfig
    from vlm_inspect.models.families import family_named
    from vlm_inspect.training.model import build_model

    family = family_named(name)
    model_dir = family.build_tiny(tmp_path / "m")
    cfg = TrainConfig(model=str(model_dir), data="-", out="-", method="qlora", lora_r=4, lora_alpha=8)
    model, _ = build_model(cfg, torch.bfloat16, torch.device("cuda"))
    assert any(type(m).__name__ == "Linear4bit" for m in family.inner(model).language_model.modules())
    for part in (family.vision_tower(model), family.projector_module(model)):
        assert all(p.dtype == torch.bfloat16 for p in part.parameters())
    assert any(p.requires_grad for p in family.projector_module(model).parameters())

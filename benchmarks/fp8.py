"""FP8 base weights (`precision=fp8`, issue 21) next to bf16 on the LLaVA-1.5-7B shape, in one run.

Sections (`--only`, comma-separated, in this order):
- accuracy: weight scales per tensor, per row and per 128 × 128 block on weights shaped like trained ones
  (heavy tails, rows of different sizes, outlier input columns): weight and product errors (CPU is fine);
- kernels: one frozen 7B linear at 8 × 640 tokens, bf16 against `Fp8Linear`, forward and forward + input
  gradient, each compiled as in a decoder layer;
- train: our LoRA rows (24 GB plan, no checkpointing, no checkpointing with the vision layers eager) in
  bf16, then the same base converted with `to_fp8`; the loss of 30 steps on the same data and seed in
  each; the bf16 run's adapter merged into a copy of the base, scored in bf16 and in FP8 (p(NG), logits);
- describe: describe at batch 1 in FP8 (bf16 is in `results/h200-infer.json`);
- tiny-task (not in the default): `train` and `predict` on the tiny model and synthetic photos, in bf16 and fp8.

Everything else (the model, the dataset, the training and score rows, timing) is `gpu.py`'s.
    PYTHONPATH=src python benchmarks/fp8.py --out benchmarks/results/h200-fp8.json
    PYTHONPATH=src python benchmarks/fp8.py --only describe,tiny-task --out benchmarks/results/h200-fp8-describe-tiny.json
    python benchmarks/fp8.py --plot benchmarks/results/h200-fp8.json benchmarks/results/h200-fp8-describe-tiny.json \
        --out benchmarks/results/h200-fp8-loss.png
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu  # noqa: E402  (benchmarks/gpu.py: model, data, rows, timing)

from vlm_inspect.config import TrainConfig  # noqa: E402
from vlm_inspect.folders import RunFolder  # noqa: E402
from vlm_inspect.inference import Predictor  # noqa: E402
from vlm_inspect.models import fp8 as fp8_module  # noqa: E402
from vlm_inspect.models.families import family_of_model
from vlm_inspect.models.fp8 import Fp8Linear, dequantize, quantize_rows, to_fp8  # noqa: E402
from vlm_inspect.training import loop, memory  # noqa: E402
from vlm_inspect.training import model as training_model
from vlm_inspect.training.plan import Plan  # noqa: E402

CARD = 23.6 - 0.5  # a 24 GB card less the CUDA context, as gpu.py's 24 GB plan
TARGETS = {  # the targets for the FP8 rows: (rate at least, peak GiB at most)
    "LoRA train, batch 8": (28.0, 22.0),
    "LoRA train, no checkpointing, batch 8": (34.0, None),
    "OK/NG score, batch 32": (110.0, None),
    "describe 48 tokens, batch 1": (5.0, None),
}
CURVE_STEPS = 30


def weight_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed (Student t, 5 dof) entries, rows scaled log-normally, 4 input columns 8× larger."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(5.0).sample((rows, cols)) * 0.02
    w *= torch.exp(torch.randn(rows, 1, generator=gen) * 0.5)
    w[:, torch.randperm(cols, generator=gen)[:4]] *= 8
    return w


def quantize_with(w: torch.Tensor, how: str) -> torch.Tensor:
    """w after e4m3 quantization with one scale per tensor, per row, or per 128 × 128 block."""
    if how == "row":
        return dequantize(*quantize_rows(w))
    if how == "tensor":
        return dequantize(*quantize_rows(w.reshape(1, -1))).reshape(w.shape)
    rows, cols = w.shape
    blocks = w.reshape(rows // 128, 128, cols // 128, 128).permute(0, 2, 1, 3).reshape(rows // 128, cols // 128, -1)
    back = dequantize(*quantize_rows(blocks))
    return back.reshape(rows // 128, cols // 128, 128, 128).permute(0, 2, 1, 3).reshape(rows, cols)


def accuracy_rows(result: dict[str, Any], tiny: bool) -> None:
    """Relative errors of the weight and of x @ W.T (x quantized per token, with outlier channels)."""
    torch.manual_seed(0)
    shapes = [(512, 1024)] if tiny else [(4096, 4096), (11008, 4096), (4096, 11008)]
    out = {}
    for n, k in shapes:
        w = weight_like(n, k, seed=n + k)
        x = torch.randn(256, k)
        x[:, torch.randperm(k)[:8]] *= 20  # LLM activations carry a few very large channels
        exact = x.double() @ w.double().T
        xq = dequantize(*quantize_rows(x)).double()
        for how in ("tensor", "row", "block"):
            wq = quantize_with(w, how).double()
            out[f"{n}x{k} {how}"] = {
                "weight_rel_error": float((wq - w.double()).norm() / w.double().norm()),
                "product_rel_error": float((xq @ wq.T - exact).norm() / exact.norm()),
            }
            print(f"[accuracy] {n}x{k} {how}: {out[f'{n}x{k} {how}']}", flush=True)
    result["accuracy"] = out


def kernel_rows(bench: gpu.Bench, result: dict[str, Any]) -> None:
    """bf16 `nn.Linear` against `Fp8Linear` on the 7B's linear shapes, M = 8 × 640, each compiled."""
    tokens, out = 8 * 640, {}
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        linear = torch.nn.Linear(k, n, bias=False, device=bench.device, dtype=torch.bfloat16).requires_grad_(False)
        layers = {"bf16": linear, "fp8": Fp8Linear(linear)}
        x = torch.randn(tokens, k, device=bench.device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, n, device=bench.device, dtype=torch.bfloat16)
        for name, layer in layers.items():
            compiled = torch.compile(layer)

            def forward(c: Any = compiled, x: torch.Tensor = x) -> None:
                with torch.no_grad():
                    c(x)

            def step(c: Any = compiled, x: torch.Tensor = x, grad: torch.Tensor = grad) -> None:
                c(x).backward(grad)

            fwd, both = (gpu.timed(bench.device, fn, 3) and gpu.timed(bench.device, fn, 20) for fn in (forward, step))
            flops = 2 * tokens * n * k
            out[f"{n}x{k} {name}"] = {
                "forward_tflops": round(flops / fwd / 1e12),
                "forward_and_input_grad_tflops": round(2 * flops / both / 1e12),
            }
            print(f"[kernels] {n}x{k} {name}: {out[f'{n}x{k} {name}']}", flush=True)
        with torch.no_grad():
            ref = x.detach().float() @ linear.weight.float().T
            out[f"{n}x{k} fp8 rel error"] = round(float((layers["fp8"](x).float() - ref).norm() / ref.norm()), 4)
        x.grad = None
    result["kernels"] = out


def label_by_spot(bench: gpu.Bench) -> None:
    """Answers start with OK on the photos without a spot (even indices), NG on the others."""
    path = bench.data / "train.json"
    samples = json.loads(path.read_text())
    for i, sample in enumerate(samples):
        if i % 2 == 0:
            sample["conversations"][1]["value"] = sample["conversations"][1]["value"].replace("NG.", "OK.", 1)
    path.write_text(json.dumps(samples))


def loss_curve(bench: gpu.Bench, setup: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of CURVE_STEPS steps at batch 8 without checkpointing, seed 0; and the trained weights."""
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    set_seed(0)
    cfg = TrainConfig(model="(in memory)", data=str(bench.data), out=str(bench.work / "curve"), batch_size=8)
    model = training_model.apply_lora(bench.model, cfg, family_of_model(bench.model))
    dataset = bench.dataset()
    steps = 3 if bench.tiny else CURVE_STEPS
    plan = Plan(len(dataset), 1, 8, 1, len(dataset) // 8, steps, 1.0, 1, 10**9)
    checkpointing = memory.Checkpointing(0, len(memory.language_layers(model)))
    trainer = loop.build_trainer(
        cfg,
        RunFolder(bench.work / "curve"),
        model,
        dataset,
        gpu.collator(bench),
        plan,
        gpu.bench_dtype(bench),
        checkpointing,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    print(f"[curve] {setup}: {[round(v, 3) for v in losses]}", flush=True)
    gpu.release(bench, model, trainer)
    return losses, trained


def merged_copy(bench: gpu.Bench, trained: dict[str, torch.Tensor]) -> Any:
    """A copy of the base with the trained adapter (and projector) merged in."""
    cfg = TrainConfig(model="-", data="-", out="-")
    model = training_model.apply_lora(copy.deepcopy(bench.model), cfg, family_of_model(bench.model))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value)
    return model.merge_and_unload().eval()


def score(bench: gpu.Bench, model: Any, setup: str) -> tuple[gpu.Row, torch.Tensor, torch.Tensor]:
    """Score row at batch 32 through `Predictor.score`; p(NG) of all photos and the last logits of 32."""
    predictor = Predictor(model, bench.processor, setup, has_adapter=False)
    batch = 32 if not bench.tiny else 4
    group = bench.images[:batch]
    row = gpu.Row("OK/NG score, batch 32", setup, batch)
    started = time.perf_counter()
    predictor.score(group, gpu.QUESTION, batch_size=batch)
    row.detail["first_call_s"] = round(time.perf_counter() - started, 1)
    gpu.reset_peak(bench.device)
    seconds = gpu.timed(bench.device, lambda: predictor.score(group, gpu.QUESTION, batch_size=batch), 5)
    row.rate, row.peak_gib = batch / seconds, gpu.peak_gib(bench.device)
    p_ng = torch.tensor(predictor.score(bench.images, gpu.QUESTION, batch_size=batch))
    with torch.inference_mode():
        logits = predictor._last_logits(predictor._inputs(group, [predictor.prompt(gpu.QUESTION)] * batch)).cpu()
    return bench.record(row), p_ng, logits


def compare(p_a: torch.Tensor, p_b: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor) -> dict[str, float]:
    return {
        "p_ng_max_abs_diff": float((p_a - p_b).abs().max()),
        "p_ng_mean_abs_diff": float((p_a - p_b).abs().mean()),
        "p_ng_range": [float(p_a.min()), float(p_a.max())],
        "logits_rel_error": float((logits_a - logits_b).norm() / logits_a.norm()),
        "top1_agreement": float((logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean()),
        "verdict_agreement_at_0.5": float(((p_a >= 0.5) == (p_b >= 0.5)).float().mean()),
    }


def train_section(bench: gpu.Bench, result: dict[str, Any]) -> None:
    label_by_spot(bench)
    bench.build_model()
    rows = [
        ("LoRA train, batch 8", "(24 GB plan)", {"budget_gib": CARD}),
        ("LoRA train, no checkpointing, batch 8", "", {"gradient_checkpointing": False}),
    ]
    eager_vision = (
        "LoRA train, no checkpointing, batch 8",
        ", vision layers eager",
        {"gradient_checkpointing": False, "undo": ("vision_compile",)},
    )
    numerics: dict[str, Any] = {}
    curves: dict[str, list[float]] = {}
    for precision in ("bf16", "fp8"):
        if precision == "fp8":
            numerics["converted_linears"] = to_fp8(bench.model)
        for work, setup, settings in rows:
            if bench.time_left():
                gpu.train_ours(
                    bench, work, f"ours {precision}{' ' if setup.startswith('(') else ''}{setup}", 8, **settings
                )
        if bench.time_left():
            curves[precision], trained = loss_curve(bench, precision)
        if precision == "bf16" and bench.time_left():
            merged = merged_copy(bench, trained)
            _, p_bf16, logits_bf16 = score(bench, merged, "ours bf16 (merged)")
            with torch.inference_mode():  # the bf16 noise floor: the same weights without compiled layers
                n = len(logits_bf16)
                eager_predictor = Predictor(merged, bench.processor, "-", False)
                inputs = eager_predictor._inputs(bench.images[:n], [eager_predictor.prompt(gpu.QUESTION)] * n)
                eager = merged(**inputs, logits_to_keep=1).logits[:, -1].float().cpu()
            numerics["bf16_compiled_vs_eager_logits_rel_error"] = float(
                (eager - logits_bf16).norm() / logits_bf16.norm()
            )
            to_fp8(merged)
            _, p_fp8, logits_fp8 = score(bench, merged, "ours fp8 (merged)")
            numerics["merged_bf16_vs_fp8"] = compare(p_bf16, p_fp8, logits_bf16, logits_fp8)
            print(f"[numerics] {numerics}", flush=True)
            del merged
            torch.cuda.empty_cache()
        if precision == "fp8" and bench.time_left():  # after the curve: the lever comes last
            gpu.train_ours(bench, eager_vision[0], f"ours fp8{eager_vision[1]}", 8, **eager_vision[2])
        result.update(numerics=numerics, loss_curves=curves)
        bench.out and bench.out.write_text(json.dumps(bench.result(), indent=1, default=str))
    if len(curves) == 2:
        bf16, fp8 = (torch.tensor(curves[p]) for p in ("bf16", "fp8"))
        numerics["loss_max_abs_diff"] = float((bf16 - fp8).abs().max())
        numerics["loss_last5_mean"] = {"bf16": float(bf16[-5:].mean()), "fp8": float(fp8[-5:].mean())}


def describe_row(bench: gpu.Bench) -> None:
    """describe, 48 new tokens, batch 1, through `Predictor.describe` on the FP8 base."""
    predictor = Predictor(bench.model.eval(), bench.processor, "fp8", has_adapter=False)
    row = gpu.Row("describe 48 tokens, batch 1", "ours fp8", 1)
    try:
        started = time.perf_counter()
        predictor.describe(bench.images[:1], gpu.QUESTION, 48, 1)
        row.detail["first_call_s"] = round(time.perf_counter() - started, 1)
        seconds = gpu.timed(bench.device, lambda: predictor.describe(bench.images[:1], gpu.QUESTION, 48, 1), 5)
        row.rate, row.peak_gib = 1 / seconds, gpu.peak_gib(bench.device)
    except Exception as err:
        row.error = f"{type(err).__name__}: {err}"[:400]
        traceback.print_exc()
    bench.record(row)


def tiny_task(work: Path, result: dict[str, Any], steps: int) -> None:
    """The tiny-model task through the real verbs: `train` LoRA on synthetic photos in bf16 and in fp8 (same
    data and seed), then `predict` each run's adapter on the same photos in its precision."""
    from vlm_inspect.config import PredictConfig, PrepareConfig, build_config
    from vlm_inspect.data.synthetic import write_dataset_folders
    from vlm_inspect.models.families.llava import save_tiny_model
    from vlm_inspect.predict import predict
    from vlm_inspect.prepare import prepare
    from vlm_inspect.train import train

    photos = write_dataset_folders(work / "photos", 48, 48, seed=0)
    data = prepare(PrepareConfig(src=str(photos), out=str(work / "dataset"), product="box"))
    model = save_tiny_model(work / "tiny-model", seed=0, output_std=96**-0.5)
    out: dict[str, Any] = {}
    for precision in ("bf16", "fp8"):
        run = work / f"run-{precision}"
        settings = [f"precision={precision}", f"min_steps={steps}", "lr=1e-3", "batch_size=8", "augment=false"]
        started = time.perf_counter()
        train(build_config(TrainConfig, None, settings, model=str(model), data=str(data), out=str(run)))
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        preds = predict(
            PredictConfig(
                model=str(model),
                adapter=str(run),
                paths=[str(photos)],
                out=str(work / f"{precision}.jsonl"),
                precision=precision,
                batch_size=32,
            )
        )
        p_ng = [json.loads(line)["p_ng"] for line in preds.read_text().splitlines()]
        out[precision] = {"train_s": round(seconds, 1), "loss": [r["loss"] for r in rows if "loss" in r], "p_ng": p_ng}
    bf16, fp8 = (torch.tensor(out[p]["loss"]) for p in ("bf16", "fp8"))
    p_bf16, p_fp8 = (torch.tensor(out[p]["p_ng"]) for p in ("bf16", "fp8"))
    out["summary"] = {
        "loss_last10_mean": {"bf16": float(bf16[-10:].mean()), "fp8": float(fp8[-10:].mean())},
        "loss_max_abs_diff": float((bf16 - fp8).abs().max()),
        "p_ng_max_abs_diff": float((p_bf16 - p_fp8).abs().max()),
        "p_ng_mean_abs_diff": float((p_bf16 - p_fp8).abs().mean()),
        "verdict_agreement_at_0.5": float(((p_bf16 >= 0.5) == (p_fp8 >= 0.5)).float().mean()),
    }
    print(f"[tiny task] {out['summary']}", flush=True)
    result["tiny_task"] = out


def plot_curves(panels: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Loss per step, one panel per run pair (bf16 blue, fp8 orange), as a PNG drawn with PIL."""
    from PIL import Image, ImageDraw

    width, height, pad = 560, 300, 40
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    colours = {"bf16": (31, 119, 180), "fp8": (255, 127, 14)}
    for index, (title, curves) in enumerate(panels.items()):
        left = index * width
        top = max(max(c) for c in curves.values())
        steps = max(len(c) for c in curves.values())
        draw.rectangle((left + pad, pad, left + width - 10, height - pad), outline="black")
        draw.text((left + pad, 12), f"{title}: loss per step (0 to {top:.2f})", fill="black")
        for row, (name, curve) in enumerate(curves.items()):
            points = [
                (
                    left + pad + (width - pad - 10) * i / max(steps - 1, 1),
                    height - pad - (height - 2 * pad) * v / top,
                )
                for i, v in enumerate(curve)
            ]
            draw.line(points, fill=colours[name], width=2)
            draw.text((left + width - 70, pad + 8 + 14 * row), name, fill=colours[name])
        draw.text((left + pad, height - pad + 8), f"step 1 to {steps}", fill="black")
    image.save(path)


def table(bench: gpu.Bench) -> str:
    lines = ["| work | setup | rate | peak GiB | estimate GiB | checkpointing |", "|---|---|---|---|---|---|"]
    for r in bench.rows:
        rate = f"{r.rate:.2f}/s" if r.rate else (r.error or "—")[:60]
        est = r.detail.get("estimate_gib")
        lines.append(
            f"| {r.work} | {r.setup} | {rate} | {r.peak_gib or 0:.1f} | {est or 0:.1f} | {r.detail.get('checkpointing', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="accuracy,kernels,train,describe", help="comma-separated sections")
    parser.add_argument("--tiny", action="store_true", help="small model on CPU: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results (written after each row)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per training row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--deadline", type=float, default=540, help="seconds after which remaining rows are skipped")
    parser.add_argument("--plot", type=Path, nargs=2, metavar=("RESULTS", "TINY_RESULTS"), help="draw the curves")
    args = parser.parse_args()
    if args.plot:
        seven_b, tiny = (json.loads(path.read_text()) for path in args.plot)
        tiny_curves = {p: tiny["tiny_task"][p]["loss"] for p in ("bf16", "fp8")}
        panels = {"7B shape, batch 8": seven_b["loss_curves"], "tiny-model task, batch 8": tiny_curves}
        plot_curves(panels, args.out)
        return
    sections = set(args.only.split(","))
    result: dict[str, Any] = {"targets_fp8": TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        if "accuracy" in sections:
            accuracy_rows(result, args.tiny)
        if sections == {"accuracy"}:
            args.out and args.out.write_text(json.dumps(result, indent=1))
            return
        bench = gpu.Bench(args.tiny, args.steps, args.warmup, Path(tmp), args.out, args.deadline)
        rows_only = bench.result
        bench.result = lambda: {**rows_only(), **result}  # every rewrite of the JSON keeps this script's keys
        if args.tiny:  # the CPU check runs the FP8 layers emulated
            fp8_module.fp8_supported = lambda device: (True, "tiny CPU check")
        if "kernels" in sections and bench.device.type == "cuda" and bench.time_left():
            kernel_rows(bench, result)
        if "train" in sections:
            train_section(bench, result)
        if "describe" in sections and bench.device.type == "cuda" and bench.time_left():
            if bench.model is None:  # describe alone: the base straight to FP8
                bench.build_model()
                result.setdefault("numerics", {})["converted_linears"] = to_fp8(bench.model)
            describe_row(bench)
        if "tiny-task" in sections and bench.time_left():
            tiny_task(Path(tmp) / "tiny", result, 12 if args.tiny else 150)
        result = bench.result()
        print("\n" + table(bench))
        print(json.dumps({k: result.get(k) for k in ("numerics", "loss_curves")}, default=str))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1, default=str))
            print(f"\nwrote {args.out}")
        print(f"total {result['seconds']} s")


if __name__ == "__main__":
    main()

"""LoRA on the LLaVA-1.5-7B shape across GPUs, through the real `vlm-inspect train --distributed NAME` (issue 9).

Writes LLaVA-1.5-7B's shape with random bf16 weights (benchmarks/gpu.py's model and data) to a model
folder, then trains with the product's defaults (LoRA r 128 on every LM linear, projector trained) through
the CLI, each run a fresh process tree as a user's would be:
- `1gpu`: one GPU, batch 8, grad accum 2: the same 16 samples per optimizer step as 2 GPUs × batch 8;
- `ddp`, `zero2`, `zero3`, `fsdp`: the shipped launcher configs on N GPUs, batch 8 per GPU.

Per run it reports samples/s between logged steps after warm-up (from metrics.jsonl's `seconds`), scaling
efficiency (samples/s ÷ (N × the 1-GPU samples/s)), peak GiB (rank 0's tensors from metrics.jsonl, and
every GPU's memory in use from nvidia-smi, which includes the CUDA context and the allocator's cache),
per-step losses against the 1-GPU run's, and the wall time of the whole command. Then each saved adapter
is loaded onto the base (PEFT) and its loss on a fixed batch compared with the 1-GPU adapter's.

Run on a machine with 2+ GPUs (the package need not be installed; deepspeed for zero2/zero3):
    PYTHONPATH=src python benchmarks/multi_gpu.py --setups 1gpu,ddp,zero2 --out $OUT/a.json
    PYTHONPATH=src python benchmarks/multi_gpu.py --setups zero3,fsdp --reference $OUT/a.json --out $OUT/b.json
On CPU, `--tiny` runs the same commands on a tiny model with 2 gloo processes (numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu as single_gpu  # noqa: E402  (benchmarks/gpu.py: the 7B shape, its dataset and versions)

PER_GPU_BATCH = 8
BASE = "base (adapter disabled)"
WARMUP_STEPS = 3  # compiling and the first allocations happen in these; not timed


class GpuMemoryWatch:
    """Polls nvidia-smi for each GPU's memory in use and keeps the maximum (all processes on the card)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_gib, self._stop = interval, {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                lines = subprocess.run(
                    ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.splitlines()
            except (OSError, subprocess.CalledProcessError):
                return
            for line in lines:
                index, used_mib = (int(x) for x in line.split(","))
                self.peak_gib[index] = max(self.peak_gib.get(index, 0.0), round(used_mib / 1024, 2))
            time.sleep(self.interval)

    def __enter__(self) -> GpuMemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def write_model(work: Path, tiny: bool) -> tuple[Path, Path]:
    """The 7B shape with random weights (deterministic per seed) and the benchmark's dataset, on disk."""
    bench = single_gpu.Bench(tiny=tiny, steps=0, warmup=0, work=work, out=None, deadline=1e9)
    folder = work / "model"
    if not (folder / "config.json").exists():
        started = time.perf_counter()
        model = bench.build_model()
        model.save_pretrained(folder)
        bench.processor.save_pretrained(folder)
        del model, bench.model
        torch.cuda.empty_cache()
        print(f"[model] written to {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder, bench.data


def train_command(setup: str, model: Path, data: Path, run: Path, gpus: list[int], steps: int) -> list[str]:
    """`vlm-inspect train` as a user types it; only the run length and logging are set for the benchmark.

    A setup may carry settings after colons, a variant to compare: `zero2:compile=true`.
    """
    name, *settings = setup.split(":")
    cmd = [sys.executable, "-m", "vlm_inspect.cli", "train", "--model", str(model), "--data", str(data)]
    cmd += ["--out", str(run), "--overwrite", f"batch_size={PER_GPU_BATCH}", f"min_steps={steps}"]
    cmd += ["logging_steps=1", "save_fraction=1", *settings]  # one checkpoint, at the end: saving is timed too
    if name == "1gpu":
        return cmd + ["--gpus", str(gpus[0]), f"grad_accum={len(gpus)}"]
    return cmd + ["--gpus", ",".join(map(str, gpus)), "--distributed", name]


def run_setup(setup: str, model: Path, data: Path, work: Path, gpus: list[int], steps: int) -> dict[str, Any]:
    run = work / "runs" / setup.replace(":", "_").replace("=", "-")
    cmd = train_command(setup, model, data, run, gpus, steps)
    print(f"[run] {setup}: {' '.join(cmd[2:])}", flush=True)
    started = time.perf_counter()
    with GpuMemoryWatch() as watch:
        result = subprocess.run(cmd, check=False)
    one_gpu = setup.split(":")[0] == "1gpu"
    row: dict[str, Any] = {"setup": setup, "gpus": 1 if one_gpu else len(gpus), "command": cmd[2:]}
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row["nvidia_smi_peak_gib"] = watch.peak_gib
    if result.returncode != 0:
        row["error"] = f"exit {result.returncode}"
        return row
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [m for m in metrics if "loss" in m]
    row["losses"] = [m["loss"] for m in steps_logged]
    row["rank0_peak_gib"] = max((m["gpu_peak_gib"] for m in steps_logged if "gpu_peak_gib" in m), default=None)
    samples_per_step = PER_GPU_BATCH * len(gpus)  # the same for 1gpu (grad accum) and N GPUs
    timed = steps_logged[WARMUP_STEPS - 1 :]
    if len(timed) >= 2:
        seconds = timed[-1]["seconds"] - timed[0]["seconds"]
        row["samples_per_s"] = round((timed[-1]["step"] - timed[0]["step"]) * samples_per_step / seconds, 2)
        row["timed_steps"] = timed[-1]["step"] - timed[0]["step"]
    row["adapter"] = str(run / "adapter")
    return row


def adapter_losses(model_dir: Path, data: Path, rows: list[dict[str, Any]], device: torch.device) -> dict[str, float]:
    """Load every saved adapter onto one copy of the base and take its loss on the same fixed batch."""
    from peft import PeftModel

    from vlm_inspect.data.dataset import Collator, load_training_dataset
    from vlm_inspect.models.families import family_of_model
    from vlm_inspect.models.load import load_model, load_processor

    processor = load_processor(model_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_model(model_dir, dtype=dtype, device=device)
    base.config.use_cache = False
    dataset = load_training_dataset(data, processor, family_of_model(base), max_length=2048)
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(PER_GPU_BATCH)])
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    losses, model = {}, None
    for row in rows:
        if "error" in row:
            continue
        if model is None:
            model = PeftModel.from_pretrained(base, row["adapter"], adapter_name=row["setup"])
        else:
            model.load_adapter(row["adapter"], adapter_name=row["setup"])
        model.set_adapter(row["setup"])
        with torch.no_grad():
            losses[row["setup"]] = round(model(**batch).loss.item(), 5)
    if model is not None:
        with model.disable_adapter(), torch.no_grad():
            losses[BASE] = round(model(**batch).loss.item(), 5)
    return losses


def compare(rows: list[dict[str, Any]], reference: dict[str, Any] | None) -> None:
    """Scaling efficiency and losses against the 1-GPU run (this run's, or --reference's).

    Step 1's loss is the base model's on the same 16 samples (it checks the data split and the loss
    reduction); step 2's comes after one optimizer step (it checks the gradient averaging). Later steps
    drift apart: a random model memorising one answer at lr 2e-4 is chaotic, so bf16 rounding grows.
    """
    one = next((r for r in rows if r["setup"] == "1gpu" and "error" not in r), reference)
    if one is None:
        return
    for row in rows:
        if row is one or "error" in row:
            continue
        if one.get("samples_per_s") and row.get("samples_per_s"):
            row["scaling_efficiency"] = round(row["samples_per_s"] / (row["gpus"] * one["samples_per_s"]), 3)
        diffs = [abs(a - b) / abs(b) for a, b in zip(row["losses"], one["losses"], strict=True)]
        row["step_loss_rel_diff_vs_1gpu"] = [round(d, 5) for d in diffs]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setup | GPUs | samples/s | scaling eff. | rank-0 peak GiB | nvidia-smi peak GiB per GPU | "
        "loss diff vs 1 GPU, step 1 / step 2 | saved adapter's loss on a fixed batch | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        smi = ", ".join(f"{v:.1f}" for _, v in sorted(r["nvidia_smi_peak_gib"].items())) or "-"
        if "error" in r:
            lines.append(f"| {r['setup']} | {r['gpus']} | {r['error']} | | | {smi} | | | {r['wall_s']} |")
            continue
        diffs = r.get("step_loss_rel_diff_vs_1gpu")
        loss_diff = f"{100 * diffs[0]:.3f}% / {100 * diffs[1]:.2f}%" if diffs else "-"
        lines.append(
            f"| {r['setup']} | {r['gpus']} | {r.get('samples_per_s')} | {r.get('scaling_efficiency', '-')} | "
            f"{r.get('rank0_peak_gib')} | {smi} | {loss_diff} | {r.get('fixed_batch_loss', '-')} | {r['wall_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default="1gpu,ddp,zero2,zero3,fsdp")
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlm-inspect-multi-gpu"))
    parser.add_argument("--reference", type=Path, help="an earlier run's JSON holding the 1gpu row")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU, 2 gloo processes")
    args = parser.parse_args()

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared hosts (device notes)
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    started = time.perf_counter()
    gpu_count = torch.cuda.device_count() if not args.tiny else 0
    gpus = list(range(max(2, gpu_count)))
    model, data = write_model(args.work, args.tiny)
    rows: list[dict[str, Any]] = []
    for setup in args.setups.split(","):
        rows.append(run_setup(setup, model, data, args.work, gpus, args.steps))
        save(args.out, {"rows": rows, "partial": True})  # a run cut off at its time limit keeps its rows
    device = torch.device("cuda", 0) if gpu_count else torch.device("cpu")
    losses = adapter_losses(model, data, rows, device)
    for row in rows:
        if row["setup"] in losses:
            row["fixed_batch_loss"] = losses[row["setup"]]
    reference = None
    if args.reference:
        reference = next(r for r in json.loads(args.reference.read_text())["rows"] if r["setup"] == "1gpu")
    compare(rows, reference)
    result = {
        "device": torch.cuda.get_device_name(0) if gpu_count else "cpu (tiny check)",
        "gpus": gpu_count,
        "versions": single_gpu.versions(),
        "shape": "tiny (CPU check only)" if args.tiny else "LLaVA-1.5-7B, random bf16 weights",
        "per_gpu_batch": PER_GPU_BATCH,
        "base_fixed_batch_loss": losses.get(BASE),
        "reference_1gpu": reference,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    print(table(rows), flush=True)
    print(f"the base model's loss on that fixed batch (adapter disabled): {losses.get(BASE)}", flush=True)
    save(args.out, result)


def save(out: Path | None, result: dict[str, Any]) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

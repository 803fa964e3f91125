"""`vlm-inspect env`: what is installed and which devices are seen, for bug reports."""

from __future__ import annotations

import importlib.metadata
import platform

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlm_inspect.config import EnvConfig

CORE = ["vlm-inspect", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "pillow"]
EXTRAS = {
    "serve": ["fastapi", "uvicorn"],
    "gpu": ["bitsandbytes"],
    "deepspeed": ["deepspeed"],
    "tensorboard": ["tensorboard"],
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_report() -> dict:
    """Versions, devices and extras as a plain dict."""
    import torch

    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in CORE},
        "cuda": torch.version.cuda,
        "cuda_devices": devices,
        "extras": {extra: all(_version(d) for d in dists) for extra, dists in EXTRAS.items()},
    }


def env(cfg: EnvConfig | None = None) -> dict:
    """Print env_report as tables and return it."""
    report = env_report()
    console = Console()
    table = Table(title="vlm-inspect environment", show_header=False)
    table.add_row("python", report["python"])
    table.add_row("platform", report["platform"])
    for name, version in report["packages"].items():
        table.add_row(name, version or "[red]not installed[/]")
    table.add_row("CUDA (torch build)", report["cuda"] or "none (CPU build)")
    table.add_row("CUDA devices", f"{len(report['cuda_devices'])}: " + ", ".join(report["cuda_devices"]))
    for extra, present in report["extras"].items():
        table.add_row(escape(f"extra [{extra}]"), "installed" if present else "not installed")
    console.print(table)
    return report

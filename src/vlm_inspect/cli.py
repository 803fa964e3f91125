"""The `vlm-inspect` command: one verb per step of the job, each a plain library function.

Only this module exits; the library raises `VlmInspectError` with a message for the user.
Heavy imports (torch, transformers) happen inside each verb so `--help` stays quick.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from vlm_inspect import config as cfgmod
from vlm_inspect.errors import VlmInspectError

app = typer.Typer(
    name="vlm-inspect",
    help="Teach a vision-language model to inspect products from a few labelled photos, then run it.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
err_console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file of settings (see the list below).")]
OverwriteOpt = Annotated[Optional[bool], typer.Option("--overwrite", help="Replace existing output.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... or auto.")]
ImageTokensOpt = Annotated[
    Optional[int], typer.Option(help="Most image tokens per photo (dynamic-resolution families); unset: the run's.")
]
StationOpt = Annotated[Optional[Path], typer.Option(help="Station folder: records, photos, SQLite database.")]
DbOpt = Annotated[
    Optional[str], typer.Option(help="Database URL instead of DIR/station.db (postgresql+psycopg://...).")
]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="auto, bf16, fp16, fp32, or fp8 (FP8 language model).")]
LineOpt = Annotated[Optional[str], typer.Option(help="Line name recorded with each inspection.")]
BaselineOpt = Annotated[
    Optional[Path], typer.Option(help="evaluate report (folder or results.json): the drift reference.")
]


def _run(fn: Callable[[], Any]) -> Any:
    """Call a library function; turn user-facing errors into a message and exit code 1."""
    try:
        return fn()
    except VlmInspectError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, markup=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def _epilog(cls: type) -> str:
    # "\b" keeps click from re-wrapping the list into one paragraph.
    return "\b\n" + cfgmod.settings_help(cls, overrides=cls is cfgmod.TrainConfig)  # only train takes key=value


@app.command(epilog=_epilog(cfgmod.PrepareConfig))
def prepare(
    src: Annotated[Optional[Path], typer.Argument(help="Photo folder: class folders or MVTec AD layout.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Dataset folder to create.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Share held out for validation.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for split and wording.")] = None,
    language: Annotated[Optional[str], typer.Option(help="en or zh.")] = None,
    ok_name: Annotated[Optional[list[str]], typer.Option(help="Extra folder name meaning OK.")] = None,
    ng_name: Annotated[Optional[list[str]], typer.Option(help="Extra folder name meaning NG.")] = None,
    from_llava_json: Annotated[Optional[Path], typer.Option(help="Existing LLaVA JSON to validate and copy.")] = None,
    image_folder: Annotated[Optional[Path], typer.Option(help="Image folder of --from-llava-json.")] = None,
    product: Annotated[Optional[str], typer.Option(help="What the photos show, e.g. box.")] = None,
    overwrite: OverwriteOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Turn photo folders into LLaVA conversation datasets (train.json, val.json)."""
    from vlm_inspect.data.prepare import prepare as run

    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.PrepareConfig,
            config,
            src=_s(src),
            out=_s(out),
            val_fraction=val_fraction,
            seed=seed,
            language=language,
            ok_names=ok_name or None,
            ng_names=ng_name or None,
            from_llava_json=_s(from_llava_json),
            image_folder=_s(image_folder),
            product=product,
            overwrite=overwrite,
        )
    )
    _run(lambda: run(cfg))


@app.command(epilog=_epilog(cfgmod.TrainConfig))
def train(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value settings, e.g. lr=1e-4 epochs=3.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Base model folder (llava-hf layout).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder from prepare, or a LLaVA JSON.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder to write.")] = None,
    method: Annotated[Optional[str], typer.Option(help="lora, qlora or full.")] = None,
    gpus: Annotated[Optional[str], typer.Option(help="GPU ids, e.g. 0,2.")] = None,
    distributed: Annotated[Optional[str], typer.Option(help="ddp, zero2, zero3 or fsdp (accelerate launch).")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue from the newest checkpoint.")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Few-shot augmentation.")] = None,
    report_to: Annotated[Optional[str], typer.Option(help="none, tensorboard or wandb.")] = None,
    overwrite: OverwriteOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Fine-tune with LoRA, QLoRA or fully, on 1 or N devices."""
    from vlm_inspect.train import train as run

    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.TrainConfig,
            config,
            overrides,
            model=_s(model),
            data=_s(data),
            out=_s(out),
            method=method,
            gpus=gpus,
            distributed=distributed,
            resume=resume,
            augment=augment,
            report_to=report_to,
            overwrite=overwrite,
        )
    )
    _run(lambda: run(cfg))


@app.command(epilog=_epilog(cfgmod.MergeConfig))
def merge(
    model: Annotated[Optional[Path], typer.Option(help="Base model folder.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Run or adapter folder.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Merged model folder to write.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32.")] = None,
    overwrite: OverwriteOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Merge an adapter into its base and check the merged model answers like the adapter."""
    from vlm_inspect.merge import merge as run

    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.MergeConfig,
            config,
            model=_s(model),
            adapter=_s(adapter),
            out=_s(out),
            dtype=dtype,
            overwrite=overwrite,
        )
    )
    _run(lambda: run(cfg))


@app.command(epilog=_epilog(cfgmod.ConvertConfig))
def convert(
    out: Annotated[Optional[Path], typer.Option(help="Folder to write.")] = None,
    llava: Annotated[Optional[Path], typer.Option(help="Original-layout LLaVA folder.")] = None,
    vision_tower: Annotated[Optional[Path], typer.Option(help="CLIP folder, with --llava.")] = None,
    llava_lora: Annotated[Optional[Path], typer.Option(help="LoRA run folder of the original repo.")] = None,
    base: Annotated[Optional[Path], typer.Option(help="Converted base folder, with --llava-lora.")] = None,
    overwrite: OverwriteOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Convert original LLaVA checkpoints and LoRA runs to the llava-hf / PEFT layout."""
    from vlm_inspect.models.convert import convert as run

    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.ConvertConfig,
            config,
            out=_s(out),
            llava=_s(llava),
            vision_tower=_s(vision_tower),
            llava_lora=_s(llava_lora),
            base=_s(base),
            overwrite=overwrite,
        )
    )
    _run(lambda: run(cfg))


@app.command(epilog=_epilog(cfgmod.PredictConfig))
def predict(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Images or folders.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Model folder.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Adapter or run folder.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="preds.jsonl or preds.csv.")] = None,
    describe: Annotated[Optional[bool], typer.Option("--describe", help="Also describe each image.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="p(NG) threshold.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per forward pass.")] = None,
    question: Annotated[Optional[str], typer.Option(help="Question to ask.")] = None,
    image_max_tokens: ImageTokensOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    overwrite: OverwriteOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Score photos OK/NG (and describe them) with a base, tuned or merged model."""
    from vlm_inspect.predict import predict as run

    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.PredictConfig,
            config,
            paths=[str(p) for p in paths] if paths else None,
            model=_s(model),
            adapter=_s(adapter),
            out=_s(out),
            describe=describe,
            threshold=threshold,
            batch_size=batch_size,
            question=question,
            device=device,
            image_max_tokens=image_max_tokens,
            precision=precision,
            overwrite=overwrite,
        )
    )
    _run(lambda: run(cfg))


@app.command(epilog=_epilog(cfgmod.EvaluateConfig))
def evaluate(
    model: Annotated[Optional[Path], typer.Option(help="Base model folder (or merged folder).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Adapter or run folder of the tuned model.")] = None,
    base: Annotated[Optional[Path], typer.Option(help="Base folder when --model is merged.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder or labelled photo folders.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Report folder.")] = None,
    questions: Annotated[Optional[Path], typer.Option(help="Extra questions, one per line.")] = None,
    max_escape: Annotated[Optional[float], typer.Option(help="Highest escape rate allowed.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="p(NG) threshold of the main table.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per forward pass.")] = None,
    compare: Annotated[
        Optional[list[str]], typer.Option(help="Another tuned model side by side: MODEL or MODEL,ADAPTER (repeatable).")
    ] = None,
    gallery_size: Annotated[Optional[int], typer.Option(help="Most images shown with answers.")] = None,
    image_max_tokens: ImageTokensOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    overwrite: OverwriteOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Compare base and tuned models on labelled photos; write results.json and report.html."""
    from vlm_inspect.evaluate.run import evaluate as run

    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.EvaluateConfig,
            config,
            model=_s(model),
            adapter=_s(adapter),
            base=_s(base),
            data=_s(data),
            out=_s(out),
            questions=_s(questions),
            max_escape=max_escape,
            threshold=threshold,
            batch_size=batch_size,
            compare=compare or None,
            gallery_size=gallery_size,
            device=device,
            image_max_tokens=image_max_tokens,
            precision=precision,
            overwrite=overwrite,
        )
    )
    _run(lambda: run(cfg))


@app.command(epilog=_epilog(cfgmod.ServeConfig))
def serve(
    model: Annotated[Optional[Path], typer.Option(help="Model folder.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Adapter or run folder.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind.")] = None,
    port: Annotated[Optional[int], typer.Option(help="TCP port.")] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            help="Require this bearer token. Other users see it in `ps`: prefer --api-key-file or the "
            "VLM_INSPECT_API_KEY environment variable.",
            envvar="VLM_INSPECT_API_KEY",
            show_envvar=True,
        ),
    ] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File holding the bearer token.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="p(NG) threshold.")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="Most requests per forward pass.")] = None,
    image_max_tokens: ImageTokensOpt = None,
    device: DeviceOpt = None,
    station: StationOpt = None,
    db: DbOpt = None,
    precision: PrecisionOpt = None,
    line: LineOpt = None,
    baseline: BaselineOpt = None,
    shift_hours: Annotated[Optional[str], typer.Option(help="Local shift start hours, e.g. 6,14,22.")] = None,
    timezone: Annotated[Optional[str], typer.Option(help="Plant time zone, e.g. Europe/Berlin.")] = None,
    audit_rate: Annotated[Optional[float], typer.Option(help="Share of inspections in the audit sample.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the model: REST inspection, OpenAI-compatible chat, operator web page."""
    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.ServeConfig,
            config,
            model=_s(model),
            adapter=_s(adapter),
            host=host,
            port=port,
            api_key=api_key,
            api_key_file=_s(api_key_file),
            threshold=threshold,
            max_batch=max_batch,
            device=device,
            image_max_tokens=image_max_tokens,
            station=_s(station),
            db=db,
            precision=precision,
            line=line,
            baseline=_s(baseline),
            shift_hours=shift_hours,
            timezone=timezone,
            audit_rate=audit_rate,
        )
    )

    def go() -> None:
        from vlm_inspect.serve.app import serve as run  # raises an install hint without the extra

        run(cfg)

    _run(go)


@app.command(epilog=_epilog(cfgmod.WatchConfig))
def watch(
    folder: Annotated[Optional[Path], typer.Argument(help="Hot folder the camera writes photos into.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Model folder.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Adapter or run folder.")] = None,
    station: StationOpt = None,
    db: DbOpt = None,
    sort: Annotated[Optional[str], typer.Option(help="none, move (into ok/ ng/) or result-file.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="p(NG) threshold.")] = None,
    describe: Annotated[Optional[bool], typer.Option("--describe", help="Also describe NG photos.")] = None,
    poll_s: Annotated[Optional[float], typer.Option(help="Seconds between looks at the folder.")] = None,
    once: Annotated[Optional[bool], typer.Option("--once", help="Inspect what is there now, then exit.")] = None,
    max_polls: Annotated[Optional[int], typer.Option(help="Stop after this many polls.")] = None,
    device: DeviceOpt = None,
    line: LineOpt = None,
    baseline: BaselineOpt = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Serve Prometheus metrics on this port.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Inspect each new photo in a hot folder once, record it, and sort or answer it."""
    from vlm_inspect.station.watch import watch as run

    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.WatchConfig,
            config,
            folder=_s(folder),
            model=_s(model),
            adapter=_s(adapter),
            station=_s(station),
            db=db,
            sort=sort,
            threshold=threshold,
            describe=describe,
            poll_s=poll_s,
            once=once,
            max_polls=max_polls,
            device=device,
            line=line,
            baseline=_s(baseline),
            metrics_port=metrics_port,
        )
    )
    _run(lambda: run(cfg))


@app.command(epilog=_epilog(cfgmod.LabelConfig))
def label(
    photos: Annotated[Optional[Path], typer.Argument(help="Folder of photos to label.")] = None,
    station: StationOpt = None,
    db: DbOpt = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind.")] = None,
    port: Annotated[Optional[int], typer.Option(help="TCP port.")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="Require this bearer token.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Sort a fresh photo folder into OK / NG and box the defects on the station page (no model needed)."""
    from vlm_inspect.station.label import label as run

    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.LabelConfig, config, photos=_s(photos), station=_s(station), db=db, host=host, port=port,
            api_key=api_key,
        )
    )  # fmt: skip
    _run(lambda: run(cfg))


@app.command("export", epilog=_epilog(cfgmod.ExportConfig))
def export_(
    station: StationOpt = None,
    db: DbOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Class-folder tree to write.")] = None,
    overwrite: OverwriteOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write the station's reviewed photos as ok/ and ng/<type>/ folders with sidecars for prepare."""
    from vlm_inspect.station.export import export as run

    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.ExportConfig, config, station=_s(station), db=db, out=_s(out), overwrite=overwrite
        )
    )
    _run(lambda: run(cfg))


@app.command(epilog=_epilog(cfgmod.PruneConfig))
def prune(
    station: StationOpt = None,
    db: DbOpt = None,
    max_age_days: Annotated[Optional[float], typer.Option(help="Delete unreviewed records older than this.")] = None,
    max_gb: Annotated[Optional[float], typer.Option(help="Keep the stored photos under this many GiB.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Retention: delete old unreviewed records by age or photo-folder size; reviewed ones always stay."""
    from vlm_inspect.station.retention import prune as run

    cfg = _run(
        lambda: cfgmod.build_config(
            cfgmod.PruneConfig, config, station=_s(station), db=db, max_age_days=max_age_days, max_gb=max_gb
        )
    )
    _run(lambda: run(cfg))


@app.command(epilog=_epilog(cfgmod.DemoConfig))
def demo(
    out: Annotated[Optional[Path], typer.Option(help="Demo folder.")] = None,
    fast: Annotated[Optional[bool], typer.Option("--fast", help="Smaller sizes (CI).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed.")] = None,
    overwrite: OverwriteOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The whole job on CPU in minutes: synthetic boxes, tiny model, training, report."""
    from vlm_inspect.demo import demo as run

    cfg = _run(
        lambda: cfgmod.build_config(cfgmod.DemoConfig, config, out=_s(out), fast=fast, seed=seed, overwrite=overwrite)
    )
    _run(lambda: run(cfg))


@app.command()
def env() -> None:
    """Print versions of the stack, the devices seen, and which extras are installed."""
    from vlm_inspect.env import print_env

    _run(print_env)


@app.command("tiny-model")
def tiny_model(
    out: Annotated[Path, typer.Argument(help="Folder to write the tiny model to.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    family: Annotated[
        str, typer.Option(help="llava, qwen2_5_vl, qwen3_vl, internvl or gemma3: the family's layout and tokens.")
    ] = "llava",
) -> None:
    """Build a tiny random model of a family (its processor, tokenizer and chat template) for tests and trials."""
    from vlm_inspect.models.family import family_named

    path = _run(lambda: family_named(family).build_tiny(out, seed=seed))
    typer.echo(f"tiny model written to {path}")


def _s(p: Any) -> str | None:
    return None if p is None else str(p)


def main() -> None:
    """Entry point of the `vlm-inspect` script."""
    app()


if __name__ == "__main__":
    sys.exit(main())

"""The `vlm-inspect` command, built from the settings dataclasses in config.py.

One command per verb, one option per setting: its name is the field's (`image_max_tokens` → `--image-max-tokens`),
its help is the field's docstring, and every verb also takes it as `key=value` and as a key of `--config FILE`
(lowest first: the file, `key=value`, `--option`). Verb NAME runs `vlm_inspect.NAME.NAME(settings)`, imported
only when it runs, so `--help` stays quick. Only this module exits; the library raises `VlmInspectError`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from vlm_inspect import config as cfgmod
from vlm_inspect.errors import ConfigError, VlmInspectError

VERBS: dict[str, type] = {
    "prepare": cfgmod.PrepareConfig,
    "train": cfgmod.TrainConfig,
    "merge": cfgmod.MergeConfig,
    "evaluate": cfgmod.EvaluateConfig,
    "predict": cfgmod.PredictConfig,
    "serve": cfgmod.ServeConfig,
    "watch": cfgmod.WatchConfig,
    "label": cfgmod.LabelConfig,
    "export": cfgmod.ExportConfig,
    "prune": cfgmod.PruneConfig,
    "convert": cfgmod.ConvertConfig,
    "demo": cfgmod.DemoConfig,
    "tiny-model": cfgmod.TinyModelConfig,
    "env": cfgmod.EnvConfig,
}
"""Each verb and its settings, in the order `--help` lists them."""

# Third-party chatter that --verbose brings back: transformers' info and warnings, and the hub's progress bars
# ("Loading weights", "Writing model shards"); read when transformers is imported, which the verbs do later.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

app = typer.Typer(
    name="vlm-inspect",
    help="Teach a vision-language model to inspect products from a few labelled photos, then run it.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
err_console = Console(stderr=True)


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


def settings_from_command_line(
    settings: type, arguments: list[str], options: dict[str, Any], config: Path | None
) -> Any:
    """The verb's settings from its command line: `key=value` arguments and the positional setting's values,
    the `--options` given, and the `--config` file beneath them."""
    names = {f.name for f in dataclasses.fields(settings)}
    positional = getattr(settings, "positional", None)
    overrides, rest = [], []
    for argument in arguments:
        key = argument.partition("=")[0].strip().replace("-", "_")
        # NAME=VALUE sets NAME; a verb that takes photos or folders reads other words as those (`a=b.png`).
        is_setting = "=" in argument and (key in names or (positional is None and key.isidentifier()))
        (overrides if is_setting else rest).append(argument)
    explicit = {name: value for name, value in options.items() if value is not None}
    if rest and positional is None:
        raise ConfigError([f"{rest[0]!r}: not a setting of this verb; give settings as key=value or --name VALUE"])
    if rest and positional:
        if _is_list(typing.get_type_hints(settings)[positional]):
            explicit[positional] = rest
        elif len(rest) > 1:
            raise ConfigError([f"{positional}: one value expected, got {len(rest)}: {' '.join(rest)}"])
        else:
            explicit[positional] = rest[0]
    return cfgmod.build_config(settings, config, overrides, **explicit)


def _add_command(name: str, settings: type) -> None:
    positional = getattr(settings, "positional", None)
    docs = cfgmod.field_docs(settings)
    shown = f"{positional.upper()} KEY=VALUE" if positional else "KEY=VALUE"
    arguments_help = (
        f"{positional.upper()}: {docs[positional]} Then settings as key=value."
        if positional
        else "Settings as key=value."
    )
    parameters = [
        inspect.Parameter(
            "arguments",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=None,
            annotation=Annotated[
                Optional[list[str]], typer.Argument(help=arguments_help, metavar=shown, show_default=False)
            ],
        )
    ]
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        if f.name != positional:
            annotation = _option(f.name, hints[f.name], docs.get(f.name, ""), _default(f))
            parameters.append(
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
            )
    parameters += [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Optional[Path], typer.Option("--config", help="YAML file of these settings.")],
        ),
        inspect.Parameter(
            "verbose",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option("--verbose", help="Also show the libraries' own logs and bars.")],
        ),
    ]

    def command(arguments: list[str] | None = None, config: Path | None = None, verbose: bool = False, **options: Any):
        if not verbose:
            for key, value in QUIET_ENV.items():
                os.environ.setdefault(key, value)
        cfg = _run(lambda: settings_from_command_line(settings, arguments or [], options, config))
        function = name.replace("-", "_")
        _run(lambda: getattr(importlib.import_module(f"vlm_inspect.{function}"), function)(cfg))

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    app.command(name, help=(settings.__doc__ or "").strip())(command)


def _option(name: str, hint: Any, help_text: str, default: str) -> Any:
    """The typer option of one setting. Values go through the settings' own checks (config.py), so every bad
    value is reported at once, as for a YAML file."""
    flag = "--" + name.replace("_", "-")
    inner = _without_none(hint)
    text = f"{help_text}  [default: {default}]" if default else help_text
    if inner is bool:
        return Annotated[Optional[bool], typer.Option(f"{flag}/--no-{flag[2:]}", help=text, show_default=False)]
    if _is_list(inner):
        return Annotated[Optional[list[str]], typer.Option(flag, help=f"{text} (repeatable)", show_default=False)]
    return Annotated[Optional[str], typer.Option(flag, help=text, metavar=_metavar(inner), show_default=False)]


def _default(f: dataclasses.Field) -> str:
    """What --help shows as the setting's default; nothing for an unset one."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return "" if default in (None, "", []) else str(default).lower() if isinstance(default, bool) else str(default)


def _without_none(hint: Any) -> Any:
    """`int | None` → `int`; other hints unchanged."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    return next(a for a in typing.get_args(hint) if a is not type(None))


def _is_list(hint: Any) -> bool:
    return typing.get_origin(_without_none(hint)) is list


def _metavar(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "[" + "|".join(map(str, typing.get_args(hint))) + "]"
    return {int: "INTEGER", float: "NUMBER"}.get(hint, "TEXT")


for _name, _settings in VERBS.items():
    _add_command(_name, _settings)


def main() -> None:
    """Entry point of the `vlm-inspect` script."""
    app()


if __name__ == "__main__":
    sys.exit(main())

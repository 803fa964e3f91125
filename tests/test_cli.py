import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vlm_inspect import config
from vlm_inspect.cli import QUIET_ENV, VERBS, app, settings_from_command_line

COMMANDS = [command.name for command in app.registered_commands]
runner = CliRunner()


def test_every_command_is_a_verb_function_of_the_module_named_after_it():
    """Verb NAME is `vlm_inspect.NAME.NAME(settings)`: one predictable home per verb."""
    assert list(VERBS) == COMMANDS
    for name in COMMANDS:
        function = name.replace("-", "_")
        module = importlib.import_module(f"vlm_inspect.{function}")
        assert callable(getattr(module, function)), name


def test_top_level_help_lists_every_verb():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in COMMANDS:
        assert verb in result.output


@pytest.mark.parametrize("verb", COMMANDS)
def test_each_verb_lists_every_setting_with_its_docstring(verb: str):
    """One declaration per setting: the option, its help and its default all come from the dataclass field."""
    result = runner.invoke(app, [verb, "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    settings = VERBS[verb]
    docs = config.field_docs(settings)
    text = " ".join(result.output.split())
    for field in dataclasses.fields(settings):
        if field.name != getattr(settings, "positional", None):
            assert f"--{field.name.replace('_', '-')}" in text, field.name
        assert " ".join(docs[field.name].split())[:40] in text, field.name


def test_help_shows_defaults_and_the_one_spelling_of_the_image_budget():
    train = " ".join(runner.invoke(app, ["train", "--help"], terminal_width=400).output.split())
    assert "--lora-r INTEGER LoRA rank" in train and "[default: 128]" in train
    for verb in ("train", "predict", "evaluate", "serve", "watch"):
        assert "--image-max-tokens" in runner.invoke(app, [verb, "--help"]).output, verb


def test_every_verb_takes_key_value_settings_like_options():
    """`image_max_tokens=64` and `--image-max-tokens 64` are the same setting, for every verb."""
    as_pair = settings_from_command_line(config.PredictConfig, ["a.png", "image_max_tokens=64", "b.png"], {}, None)
    as_flag = settings_from_command_line(config.PredictConfig, ["a.png", "b.png"], {"image_max_tokens": "64"}, None)
    assert as_pair == as_flag and as_pair.paths == ["a.png", "b.png"] and as_pair.image_max_tokens == 64
    prepared = settings_from_command_line(config.PrepareConfig, ["photos", "out=ds", "product=box"], {}, None)
    assert (prepared.src, prepared.out, prepared.product) == ("photos", "ds", "box")
    # A photo whose name holds '=' is a photo, not a setting.
    named = settings_from_command_line(config.PredictConfig, ["shift=2.png"], {}, None)
    assert named.paths == ["shift=2.png"]


def test_options_beat_key_value_which_beat_the_config_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("threshold: 0.2\nbatch_size: 2\nmax_new_tokens: 9\n")
    cfg = settings_from_command_line(
        config.PredictConfig, ["x.png", "threshold=0.3", "batch_size=3"], {"threshold": "0.4"}, path
    )
    assert (cfg.threshold, cfg.batch_size, cfg.max_new_tokens) == (0.4, 3, 9)


def test_bad_settings_exit_non_zero_with_every_problem():
    result = runner.invoke(app, ["train", "lr=fast", "bogus=1", "--model", "m", "--batch-size", "two"])
    assert result.exit_code == 1
    assert "3 problems" in result.output
    assert "lr" in result.output and "bogus" in result.output and "batch_size" in result.output


def test_a_second_value_for_a_one_value_argument_is_refused():
    result = runner.invoke(app, ["prepare", "photos", "more-photos", "--out", "ds"])
    assert result.exit_code == 1 and "src: one value expected" in result.output


def test_help_is_quick_because_no_verb_is_imported():
    """`--help` imports neither torch nor transformers (each verb's module loads only when it runs)."""
    code = "import sys; from vlm_inspect.cli import app; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_env_prints_versions():
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "transformers" in result.output and "CUDA devices" in result.output


@pytest.mark.integration  # seconds: CI runs it, the unit loop leaves it out
def test_the_console_shows_our_output_and_the_libraries_chatter_only_with_verbose(tiny_model_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (80, 64), "white").save(tmp_path / "a.png")
    args = [sys.executable, "-m", "vlm_inspect.cli", "predict", str(tmp_path / "a.png"), "--model", str(tiny_model_dir)]
    args += ["--out", str(tmp_path / "p.jsonl"), "--overwrite"]
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}  # as a user's shell has it
    quiet = subprocess.run(args, capture_output=True, text=True, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "1 images: " in quiet.stdout and "Loading weights" not in quiet.stdout + quiet.stderr
    assert "[transformers]" not in quiet.stdout + quiet.stderr
    loud = subprocess.run([*args, "--verbose"], capture_output=True, text=True, env=env)
    assert loud.returncode == 0 and "Loading weights" in loud.stdout + loud.stderr

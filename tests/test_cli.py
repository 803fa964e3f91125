import pytest
from typer.testing import CliRunner

from vlm_inspect.cli import app

VERBS = ["prepare", "train", "merge", "convert", "predict", "evaluate", "serve", "demo", "env", "tiny-model"]
VERBS += ["watch", "label", "export", "prune"]
runner = CliRunner()


def test_top_level_help_lists_every_verb():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in VERBS:
        assert verb in result.output


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help(verb: str):
    result = runner.invoke(app, [verb, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_settings_help_lists_field_docs():
    result = runner.invoke(app, ["train", "--help"])
    assert "lora_r = 128" in result.output and "LoRA rank" in result.output
    assert "key=value" in result.output
    prepare = runner.invoke(app, ["prepare", "--help"]).output
    assert "val_fraction = 0.2" in prepare and "key=value" not in prepare  # prepare takes flags and --config


def test_bad_settings_exit_non_zero_with_every_problem():
    result = runner.invoke(app, ["train", "lr=fast", "bogus=1", "--model", "m"])
    assert result.exit_code == 1
    assert "lr" in result.output and "bogus" in result.output


def test_env_prints_versions():
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "transformers" in result.output and "CUDA devices" in result.output

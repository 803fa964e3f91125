from pathlib import Path

import pytest
import yaml

from vlm_inspect.config import (
    TrainConfig,
    build_config,
    field_docs,
    load_saved_config,
    parse_overrides,
    save_config,
)
from vlm_inspect.errors import ConfigError


def test_every_setting_of_every_verb_has_a_docstring_and_every_verb_a_summary():
    import dataclasses

    from vlm_inspect.cli import VERBS

    for cls in VERBS.values():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert missing == [], f"{cls.__name__} fields without help text: {missing}"
        assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), cls.__name__


def test_the_model_settings_group_is_one_declaration_in_every_verb_that_runs_a_model():
    import dataclasses

    from vlm_inspect import config

    group = [f.name for f in dataclasses.fields(config.ModelSettings)]
    for cls in (config.PredictConfig, config.EvaluateConfig, config.ServeConfig, config.WatchConfig):
        assert issubclass(cls, config.ModelSettings)
        assert [f.name for f in dataclasses.fields(cls)][: len(group)] == group
        assert field_docs(cls)["image_max_tokens"] == field_docs(config.ModelSettings)["image_max_tokens"]
    cfg = config.WatchConfig(model="m", adapter="a", precision="bf16", image_max_tokens=64, folder="f")
    assert cfg.model_settings() == config.ModelSettings("m", "a", 64, "auto", "bf16")


@pytest.mark.parametrize("value", [-1, 0, 1, 15, 65_537])
def test_the_image_budget_is_checked_alike_for_every_verb(value: int):
    from vlm_inspect import config

    assert config.image_budget_problems(value)
    assert config.PredictConfig(model="m", image_max_tokens=value).model_problems()
    assert not config.image_budget_problems(16) and not config.image_budget_problems(None)


def test_layers_yaml_then_overrides_then_explicit(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-3\nepochs: 2\naugment: false\n")
    cfg = build_config(TrainConfig, path, ["epochs=5", "lora_r=8"], lr=None, model="m")
    assert cfg.lr == 1e-3 and cfg.epochs == 5.0 and cfg.lora_r == 8 and cfg.augment is False and cfg.model == "m"


def test_validation_reports_every_problem_at_once(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: fast\nmethod: dora\nnot_a_setting: 1\nbatch_size: 2.5x\n")
    with pytest.raises(ConfigError) as info:
        build_config(TrainConfig, path, ["augment=maybe"])
    problems = info.value.problems
    assert len(problems) == 5, problems
    text = str(info.value)
    for word in ["lr", "method", "not_a_setting", "batch_size", "augment", "5 problems"]:
        assert word in text


def test_bad_override_syntax_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="no such config file"):
        build_config(TrainConfig, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config(TrainConfig, tmp_path / "list.yaml")


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = build_config(TrainConfig, None, ["gpus=0,2", "epochs=none"], model="m", data="d", out="o")
    path = save_config(cfg, tmp_path)
    assert yaml.safe_load(path.read_text())["kind"] == "TrainConfig"
    assert load_saved_config(TrainConfig, path) == cfg

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


def test_every_field_has_a_docstring():
    import dataclasses

    from vlm_inspect import config

    station = [config.WatchConfig, config.ExportConfig, config.LabelConfig, config.PruneConfig]
    for cls in [
        config.PrepareConfig,
        TrainConfig,
        config.MergeConfig,
        config.PredictConfig,
        config.ServeConfig,
        *station,
    ]:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert missing == [], f"{cls.__name__} fields without help text: {missing}"


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

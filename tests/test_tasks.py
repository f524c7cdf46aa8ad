"""engine/tasks: the config's task picks data, loss and metrics; models carry the task they were made for."""
import pytest

import models
from engine import tasks
from engine.config import ConfigError, build_config


def test_task_modules_follow_the_interface():
    assert "classification" in tasks.available()
    for name in tasks.available():
        module = tasks.get_task(name)
        assert module.NAME == name and isinstance(module.OPTIONS, dict)
        for attr in ("scan", "train_dataset", "loss_network", "validate", "record", "describe", "inference_network",
                     "eval_data", "evaluate", "summary", "PRIMARY_METRIC"):
            assert hasattr(module, attr), f"engine/tasks/{name}.py lacks {attr}"


def test_task_defaults_to_the_models_task():
    cfg = build_config(file_values={"model": "resnet_tiny"})
    assert cfg.task is None and tasks.task_name(cfg) == "classification"
    assert models.model_task("resnet_tiny") == "classification"
    assert tasks.task_name(build_config()) == "classification"  # no model: the default task


def test_unknown_task_and_options_are_named():
    with pytest.raises(ConfigError, match="option 'task' must be one of"):
        build_config(file_values={"task": "captioning"})
    with pytest.raises(ConfigError, match="unknown key.*'classification'.*bogus"):
        build_config(file_values={"task": "classification", "task_options": {"bogus": 1}})
    with pytest.raises(ConfigError, match="unknown key.*bogus"):
        build_config(file_values={"model": "resnet_tiny", "task_options": {"bogus": 1}})


def test_task_contradicting_the_model_is_refused():
    other = next((name for name in tasks.available() if name != "classification"), None)
    if other is None:
        pytest.skip("only the classification task is present")
    cfg = build_config(file_values={"model": "resnet_tiny", "task": other})
    with pytest.raises(ConfigError, match="is a classification model"):
        tasks.task_name(cfg)

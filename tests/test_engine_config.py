"""engine/config.py: schema defaults, YAML files, command-line overrides and their errors."""
import os

import pytest
import yaml

from engine.config import ConfigError, TRAIN_OPTIONS, build_config, load_config, parse_overrides, read_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_NAMES = [opt.name for opt in TRAIN_OPTIONS]


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


# The defaults (the torchvision ImageNet recipe), written out: a changed default must
# show here, not be compared with itself.
EXPECTED_DEFAULTS = {
    "model": None, "num_classes": None, "in_chans": 3, "train_split": "train", "val_split": "val",
    "image_size": 224, "crop_pct": 0.875, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225], "batch_size": 128, "scale": [0.08, 1.0], "hflip": 0.5, "mixup": 0.0,
    "cutmix": 0.0, "label_smoothing": 0.1, "opt": "sgd", "lr": 0.1, "min_lr": 0.0, "warmup_epochs": 0.0,
    "epochs": 90, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "decay_all_params": False,
    "no_decay_keywords": ["relative_position_bias_table", "pos_embed", "absolute_pos_embed", "cls_token",
                          "rate1", "rate2"],
    "clip_grad_norm": None, "ema_decay": None, "amp_level": "O0", "loss_scale": "none", "device_target": None,
    "mode": "graph", "seed": 42, "resume": None, "overwrite": False, "stop_at_step": None,
}


def test_defaults_are_the_documented_values():
    values = build_config().to_dict()
    assert set(values) == set(SCHEMA_NAMES)  # every option of the schema, nothing else
    assert {key: values[key] for key in EXPECTED_DEFAULTS} == EXPECTED_DEFAULTS
    assert values["ratio"] == pytest.approx([3 / 4, 4 / 3])


def test_file_then_command_line_priority(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"model": "m", "lr": 0.5, "epochs": 7, "amp_level": "O2"})
    cfg, print_only = load_config(["--config", path, "--lr", "0.01", "--amp_level=O3"])
    assert not print_only
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.amp_level) == ("m", 0.01, 7, "O3")


def test_values_are_read_as_yaml_and_coerced(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 5e-4\nval_split: null\nmean: [0.5]\nstd: [0.25]\nin_chans: 1\n")
    cfg, _ = load_config(["--config", str(path), "--mean", "[0.1]", "--clip_grad_norm", "5", "--nesterov", "true"])
    assert cfg.lr == pytest.approx(5e-4) and isinstance(cfg.lr, float)
    assert cfg.val_split is None
    assert cfg.mean == [0.1] and cfg.clip_grad_norm == 5.0 and cfg.nesterov is True


@pytest.mark.parametrize("argv, key", [
    (["--learning_rate", "0.1"], "learning_rate"),
    (["--batch_size", "1.5"], "batch_size"),
    (["--batch_size", "true"], "batch_size"),
    (["--lr", "fast"], "lr"),
    (["--hflip", "yes please"], "hflip"),
    (["--amp_level", "O5"], "amp_level"),
    (["--opt", "rmsprop"], "opt"),
    (["--mean", "0.5"], "mean"),
    (["--epochs", "null"], "epochs"),
    (["--model_overrides", "[1, 2]"], "model_overrides"),
    (["--batch_size", "0"], "batch_size"),
    (["--mean", "[0.1, 0.2]"], "mean"),
    (["--scale", "[0.1]"], "scale"),
    (["--label_smoothing", "1.0"], "label_smoothing"),
    (["--warmup_epochs", "500"], "warmup_epochs"),
    (["--lr"], "lr"),
])
def test_bad_command_line_values_name_the_option(argv, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(argv)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"lr": 0.1, "wieght_decay": 0.05})
    with pytest.raises(ConfigError) as info:
        load_config(["--config", path])
    message = str(info.value)
    assert "'wieght_decay'" in message and "bad.yaml" in message and "'weight_decay'" in message


def test_wrong_type_in_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"epochs": "ninety"})
    with pytest.raises(ConfigError, match="'epochs'.*integer"):
        load_config(["--config", path])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_yaml(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("lr: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(str(tmp_path / "broken.yaml"))


def test_parse_overrides_forms():
    assert parse_overrides(["--a", "1", "--b=x", "--c", "[1, 2]"]) == {"a": 1, "b": "x", "c": [1, 2]}
    with pytest.raises(ConfigError, match="expected an option"):
        parse_overrides(["lr", "0.1"])


def test_print_config_round_trips(tmp_path, capsys):
    cfg, print_only = load_config(["--print_config", "--model", "x", "--lr", "0.3", "--mixup", "0.2"])
    assert print_only
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(cfg.to_yaml())
    again, _ = load_config(["--config", str(dumped)])
    assert again.to_dict() == cfg.to_dict()


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{name} " in text for name in SCHEMA_NAMES)


def test_setting_an_attribute_is_checked():
    cfg = build_config()
    cfg.num_workers = 2
    assert cfg.num_workers == 2
    with pytest.raises(ConfigError, match="'num_workers'"):
        cfg.num_workers = "two"
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        cfg.nope = 1


def test_recipe_template_lists_exactly_the_schema():
    path = os.path.join(ROOT, "configs", "recipe_template.yaml")
    values = read_yaml(path)
    assert list(values) == SCHEMA_NAMES
    build_config(file_values=values)  # and every value is valid


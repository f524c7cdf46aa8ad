"""configs/: one recipe per registered paper model, each valid under train.py's schema."""
import glob
import os

import pytest

import models
from engine.config import build_config, check_train_config, read_yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEMO_MODELS = {"resnet_tiny", "resnet_tiny_acmix"}


def paper_models():
    return [name for name in models.list_models() if not name.startswith("_") and name not in DEMO_MODELS]


@pytest.mark.parametrize("name", paper_models())
def test_every_paper_model_has_a_recipe(name):
    path = os.path.join(CONFIG_DIR, f"{name}.yaml")
    assert os.path.isfile(path), f"no recipe for {name}"
    values = read_yaml(path)
    assert values["model"] == name


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))),
                         ids=lambda p: os.path.basename(p))
def test_config_is_valid(path):
    values = read_yaml(path)
    cfg = build_config(file_values=values, file_source=path)
    if values.get("model") is not None:
        assert models.is_model(values["model"])
        check_train_config(cfg)


def test_transformer_recipes_follow_the_paper():
    swin = read_yaml(os.path.join(CONFIG_DIR, "swin_tiny_acmix.yaml"))
    assert (swin["opt"], swin["lr"], swin["lr_base_batch"], swin["epochs"], swin["warmup_epochs"]) == \
        ("adamw", 5e-4, 512, 300, 20)
    assert swin["clip_grad_norm"] == 5.0 and swin["drop_path_rate"] == 0.2
    assert read_yaml(os.path.join(CONFIG_DIR, "swin_small_acmix.yaml"))["drop_path_rate"] == 0.3
    resnet = read_yaml(os.path.join(CONFIG_DIR, "resnet50_acmix.yaml"))
    assert (resnet["opt"], resnet["lr"], resnet["lr_base_batch"], resnet["epochs"]) == ("sgd", 0.1, 256, 90)

"""The official state_dict key lists (Swin-ACmix-T: 250 keys, ResNet-ACmix-50: 496 keys, from the project's
reference notes) map one to one onto our full-size models: no key left over, no parameter unfilled, every
shape equal. Builds the models only (no forward pass)."""
import ast
import os

import numpy as np
import pytest

import models
from models.convert import convert_state_dict, model_parameter_shapes

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "shared", "reference")


def official_keys(filename):
    path = os.path.join(REFERENCE, filename)
    if not os.path.isfile(path):
        pytest.skip(f"{path} not present (../shared beside the repository)")
    state = {}
    with open(path) as handle:
        for line in handle:
            if line.strip():
                key, shape = line.rstrip("\n").split("\t")
                state[key] = np.zeros(ast.literal_eval(shape), np.float32)
    return state


@pytest.mark.parametrize("model_name,filename,num_keys", [("swin_tiny_acmix", "keys_swin_acmix_t.txt", 250),
                                                          ("resnet50_acmix", "keys_resnet_acmix_50.txt", 496)])
def test_official_key_list_maps_one_to_one(model_name, filename, num_keys):
    state = official_keys(filename)
    assert len(state) == num_keys
    shapes = model_parameter_shapes(models.create_model(model_name))
    converted = convert_state_dict(state, shapes)  # raises, listing every difference, if anything is off
    assert set(converted) == set(shapes)

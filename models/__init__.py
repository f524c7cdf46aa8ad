"""Networks of the paper built from ``acmix_ms`` Cells, behind one registry.

    >>> import models
    >>> models.list_models("resnet*")
    >>> net = models.create_model("resnet26_acmix", num_classes=10, shift_impl="fixed")
"""
from .registry import create_model, is_model, list_models, model_task, paper_info, register_model
from . import resnet, san  # noqa: F401  (registers the ResNet and SAN families)
from . import swin, pvt  # noqa: F401  (registers the Swin and PVT families)
from . import retinanet  # noqa: F401  (registers the RetinaNet detectors, task 'detection')
from . import segmentation  # noqa: F401  (registers Semantic FPN and UperNet; after the backbones)

__all__ = ["create_model", "is_model", "list_models", "model_task", "paper_info", "register_model"]

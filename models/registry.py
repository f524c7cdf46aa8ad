"""Model registry: ``register_model``, ``create_model`` and ``list_models``.

Every model family file decorates its public constructors with ``@register_model``;
``create_model(name, **overrides)`` builds one by name and can load a checkpoint.
"""
import difflib
import fnmatch
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from mindspore import nn

_MODELS = {}
_PAPER_INFO = {}
_TASKS = {}


def register_model(fn: Optional[Callable] = None, *, paper: Optional[dict] = None, task: str = "classification"):
    """Register a model constructor under its function name.

    Args:
        fn: the constructor, ``fn(num_classes=1000, **kwargs) -> nn.Cell``.
        paper: optional dict of the paper's figures for the model, e.g.
            ``{"params_m": 10.6, "gmacs": 2.3, "top1": 77.8}`` (used by tools/model_table.py).
        task: what the model does (a module of ``engine.tasks``): the run config's default ``task``.
    """
    def _register(func):
        name = func.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = func
        _PAPER_INFO[name] = dict(paper or {})
        _TASKS[name] = task
        return func

    if fn is None:
        return _register
    return _register(fn)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models that match a shell-style ``pattern``."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS


def paper_info(name: str) -> dict:
    """The paper's figures recorded for ``name`` at registration (may be empty)."""
    _check_name(name)
    return dict(_PAPER_INFO[name])


def model_task(name: str) -> str:
    """The task ``name`` was registered for ('classification', 'detection', ...)."""
    _check_name(name)
    return _TASKS[name]


def _check_name(name):
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), list(_MODELS), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Registered models: {', '.join(list_models())}")


def create_model(name: str, num_classes: int = 1000, checkpoint: Optional[str] = None, strict: bool = True,
                 **overrides: Any) -> "nn.Cell":
    """Build a registered model.

    Args:
        name: a name from ``list_models()``.
        num_classes: classifier width (0 builds the network without a head).
        checkpoint: optional path of a MindSpore ``.ckpt`` to load into the model.
        strict: with a checkpoint, raise if any key is missing, unexpected or mis-shaped.
        **overrides: constructor keyword arguments (e.g. ``shift_impl='fixed'``,
            ``rate_mode='attention'``, ``drop_path_rate=0.1``); unknown ones raise.
    """
    _check_name(name)
    model = _MODELS[name](num_classes=num_classes, **overrides)
    if checkpoint is not None:
        from .weights import load_checkpoint_into
        load_checkpoint_into(model, checkpoint, strict=strict)
    return model

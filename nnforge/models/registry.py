"""Model registry: register with a decorator, build with create_model, find with list_models.

    @register_model("seed_cnn", family="image", head="head")
    def seed_cnn(num_classes, in_chans=3, img_size=32): ...

    model = create_model("seed_cnn", num_classes=10, in_chans=1, img_size=28)

Every model of a family takes the same arguments and maps a batch to logits (B, num_classes), so training,
export and serving work for all of them. `head` names the classifier submodule: the part that is replaced for
new classes and left trainable while the body is frozen.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[..., nn.Module]
    family: str
    head: str
    doc: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, family: str, head: str):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = ModelEntry(name, fn, family, head, doc)
        return fn

    return deco


def _load_builtin() -> None:
    # Importing the family modules runs their @register_model decorators.
    from nnforge.models import cnn  # noqa: F401

    for optional in ("nnforge.models.efficientnet_lite", "nnforge.models.text"):
        try:
            __import__(optional)
        except ModuleNotFoundError as err:
            if err.name != optional:
                raise


def get_entry(name: str) -> ModelEntry:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; registered: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    entry = get_entry(name)
    try:
        return entry.fn(num_classes=num_classes, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise ValueError(f"model '{name}' has no option {str(err).split('argument ')[-1]}; "
                         f"its options: {', '.join(model_options(name)) or 'none'}") from None


# Arguments every model of a family receives from the data; the rest of a builder's keywords are user options.
_DATA_ARGS = {"num_classes", "in_chans", "img_size", "pretrained", "vocab_size", "pad_id", "max_len",
              "encoder", "encoder_config", "freeze_encoder"}


def model_options(name: str) -> list[str]:
    """The keyword options a user may set through model_args, e.g. ['width=16'] for resnet_tiny."""
    import inspect

    fn = get_entry(name).fn
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):  # a thin builder: the options live on its class
        called = [fn.__globals__.get(n) for n in fn.__code__.co_names]
        cls = next((c for c in called if inspect.isclass(c) and issubclass(c, nn.Module)), None)
        params = list(params) + (list(inspect.signature(cls).parameters.values()) if cls else [])
    return [f"{p.name}={p.default!r}" for p in params
            if p.name not in _DATA_ARGS and p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty]


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    _load_builtin()
    return sorted(n for n, e in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (family is None or e.family == family))


def head_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(get_entry(name).head)

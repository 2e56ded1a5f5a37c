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
    return get_entry(name).fn(num_classes=num_classes, **kwargs)


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    _load_builtin()
    return sorted(n for n, e in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (family is None or e.family == family))


def head_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(get_entry(name).head)

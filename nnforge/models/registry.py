"""Model registry: register with a decorator, build with create_model, find with list_models.

    @register_model("seed_cnn", task="classify", input="image", head="head", data_args=IMAGE_CLASSIFIER_ARGS)
    def seed_cnn(num_classes, in_chans=3, img_size=32): ...

    model = create_model("seed_cnn", num_classes=10, in_chans=1, img_size=28)

A model belongs to a task (classify, gan, ...) and, where the task has several, an input type (image, text). Its
builder's keyword arguments are its options; `data_args` names those the task fills from the data (classes,
channels, vocabulary), the rest a user may set through model_args. Classifiers name their `head` (the part that
is replaced for new classes and left trainable while the body is frozen) and give the features before it with
`forward_features(x)`, so every classifier can also embed.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn

# Arguments a task fills from the data; everything else in a builder's signature is a user option.
IMAGE_CLASSIFIER_ARGS = frozenset({"num_classes", "in_chans", "img_size", "pretrained"})
TEXT_CLASSIFIER_ARGS = frozenset({"num_classes", "vocab_size", "pad_id", "max_len", "pretrained", "encoder",
                                  "encoder_config", "freeze_encoder"})
# Input normalisation (mean, std per RGB channel) that published weights were trained with.
IMAGENET_NORM = {"name": "imagenet", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
SYMMETRIC_NORM = {"name": "[-1, 1]", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[..., nn.Module]
    task: str                  # the task that trains it: classify, gan, ...
    input: str | None          # image, text, ... where the task takes several
    head: str | None           # classifiers: the submodule that gives the logits
    doc: str
    data_args: frozenset[str]  # keyword arguments the task fills from the data
    pretrained_norm: dict | None = None  # what the published weights expect of their inputs
    recipe: dict | None = None  # config values this model trains well with, used where the user set none

    @property
    def family(self) -> str:  # "image" / "text" for classifiers, else the task
        return self.input or self.task


@runtime_checkable
class LearnsFromData(Protocol):
    """A model with statistics of its training inputs to take before training (the n-gram model's idf weights)."""

    def fit_to_data(self, inputs: list) -> None: ...


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, task: str, input: str | None = None, head: str | None = None,
                   data_args: frozenset[str] = frozenset(), pretrained_norm: dict | None = None,
                   recipe: dict | None = None):
    """recipe: the model's own training defaults (config field -> value: lr, batch_size, epochs, ...), applied where
    the user set nothing; besides config fields it may hold min_steps (optimizer steps a run should get at least,
    however small the data), max_epochs (the ceiling of that rule) and lr_max (a larger lr is warned about)."""
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = ModelEntry(name, fn, task, input, head, doc, frozenset(data_args), pretrained_norm,
                                     dict(recipe or {}))
        return fn

    return deco


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; registered: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; kwargs are its builder's arguments (num_classes for classifiers, ...)."""
    entry = get_entry(name)
    unknown = sorted(set(kwargs) - set(inspect.signature(entry.fn).parameters))
    if unknown:
        raise ValueError(f"model '{name}' has no option {', '.join(repr(u) for u in unknown)}; its options: "
                         f"{', '.join(model_options(name)) or 'none'}")
    return entry.fn(**kwargs)


def model_options(name: str) -> list[str]:
    """The keyword options a user may set through model_args, e.g. ['width=16'] for resnet_tiny."""
    entry = get_entry(name)
    params = inspect.signature(entry.fn).parameters.values()
    return [f"{p.name}={p.default!r}" for p in params
            if p.name not in entry.data_args and p.default is not p.empty]


def list_models(pattern: str = "*", task: str | None = None, input: str | None = None) -> list[str]:
    return sorted(n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern)
                  and (task is None or e.task == task) and (input is None or e.input == input))


def head_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(get_entry(name).head)

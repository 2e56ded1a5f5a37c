"""Tasks: the unit a model family plugs into. A task declares its configs (one per `nnforge train` name), builds
data, named modules, optimizers and a training step for the engine, and evaluates a run.

    from nnforge.tasks import get_task, register_task, train_target
    task_name, config_cls = train_target("image")     # `nnforge train image` trains the classify task
    task = get_task(task_name)                         # imports the implementation on first use

The registry is light (configs only), so the command line can list every task and its flags without importing
torch. The built-in tasks register their implementation as a module path; a task defined elsewhere (a plug-in, a
test) registers the object itself: `register_task(MyTask())` with `name`, `configs`, `build` and `evaluate`
(nnforge/tasks/base.py describes them).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from nnforge.config import ConfigError, GanConfig, ImageTrainConfig, RecsysConfig, RLConfig, TextTrainConfig


@dataclass
class _Entry:
    name: str
    configs: dict[str, type]  # `nnforge train <key>` -> config class
    impl: Any  # the task object, or "module:attribute" until first use


_TASKS: dict[str, _Entry] = {}


def register_task(task: Any = None, *, name: str | None = None, configs: dict[str, type] | None = None,
                  impl: str | None = None) -> None:
    """Register a task object (its .name and .configs), or a name, configs and "module:attribute" to import later."""
    if task is not None:
        name, configs, impl = task.name, task.configs, task
    taken = {k: e.name for e in _TASKS.values() for k in e.configs}
    clash = sorted(set(configs) & set(taken)) + ([name] if name in _TASKS else [])
    if clash:
        raise ValueError(f"task '{name}': {clash} already registered")
    _TASKS[name] = _Entry(name, dict(configs), impl)


def unregister_task(name: str) -> None:
    _TASKS.pop(name, None)


def get_task(name: str):
    if name not in _TASKS:
        raise ConfigError(f"unknown task '{name}'; registered: {', '.join(_TASKS)}")
    entry = _TASKS[name]
    if isinstance(entry.impl, str):
        module, _, attr = entry.impl.partition(":")
        entry.impl = getattr(importlib.import_module(module), attr)
    return entry.impl


def train_targets() -> dict[str, tuple[str, type]]:
    """`nnforge train` names -> (task name, config class)."""
    return {key: (e.name, cls) for e in _TASKS.values() for key, cls in e.configs.items()}


def train_target(key: str) -> tuple[str, type]:
    targets = train_targets()
    if key not in targets:
        raise ConfigError(f"unknown task '{key}'; expected one of {', '.join(targets)}")
    return targets[key]


# Classification: the input type (image, text) is a property of the data; each has its own options.
register_task(name="classify", configs={"image": ImageTrainConfig, "text": TextTrainConfig},
              impl="nnforge.tasks.classify:TASK")

# Reinforcement learning: an agent acting in a gymnasium environment; PPO and DQN are each their own loop.
register_task(name="rl", configs={"rl": RLConfig}, impl="nnforge.tasks.rl:TASK")

# GANs: a generator of images like those in a folder (DCGAN, conditional DCGAN), measured with nnforge features.
register_task(name="gan", configs={"gan": GanConfig}, impl="nnforge.tasks.gan:TASK")

# Recommenders: interactions and item text in, ranked items out (popularity, BPR, text-aware two-tower, SASRec).
register_task(name="recsys", configs={"recsys": RecsysConfig}, impl="nnforge.tasks.recsys:TASK")

"""Optimizers: what one updates and how (OptimSpec), no weight decay on norms and biases, and a pickle-free state
round trip for checkpoints.

    spec = OptimSpec.from_config(cfg)                            # AdamW/SGD with the config's lr, betas, decay
    spec = OptimSpec(("generator",), lr=2e-4, betas=(0.5, 0.999), schedule="constant", warmup_epochs=0)
    opt = build_optimizer([model], spec)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nnforge.config import EngineConfig


@dataclass(frozen=True)
class OptimSpec:
    """One optimizer: the named modules it updates, its algorithm and hyper-parameters, and its LR schedule."""

    modules: tuple[str, ...] = ("model",)
    kind: str = "adamw"  # adamw | sgd (Nesterov)
    lr: float = 3e-3  # peak, reached after warmup
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    momentum: float = 0.9
    schedule: str = "onecycle"  # onecycle | cosine | constant, after warmup (engine/schedule.py)
    warmup_epochs: float = 0.0

    @classmethod
    def from_config(cls, cfg: EngineConfig, modules: tuple[str, ...] = ("model",), **changes) -> OptimSpec:
        values = dict(modules=tuple(modules), kind=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      betas=tuple(cfg.betas), eps=cfg.eps, momentum=cfg.momentum, schedule=cfg.schedule,
                      warmup_epochs=cfg.warmup_epochs)
        return cls(**{**values, **changes})


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    # Decaying a norm's scale or a bias only fights the normalisation; decay matrices and kernels alone.
    params = [p for m in modules for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(modules: nn.Module | list[nn.Module], spec: OptimSpec | EngineConfig) -> torch.optim.Optimizer:
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    spec = spec if isinstance(spec, OptimSpec) else OptimSpec.from_config(spec)
    groups = param_groups(modules, spec.weight_decay)
    if spec.kind == "adamw":
        # The fused kernel updates every parameter in one pass instead of several ops per tensor: on this
        # project's 2-core CPU a step of DCGAN's 1.1M-parameter generator took 3.8-5.0 ms with the default
        # per-tensor loop and 0.4-0.7 ms fused (resnet_tiny: 0.8-1.1 vs 0.2-0.3 ms); on CUDA, fewer launches.
        fused = next(p for m in modules for p in m.parameters()).device.type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, fused=fused or None)
    if spec.kind == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.momentum > 0)
    raise ValueError(f"unknown optimizer '{spec.kind}'; expected adamw or sgd")


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors named <prefix><param>.<key>, JSON for the rest) — no pickle needed to save or load it."""
    sd = opt.state_dict()
    tensors, rest = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{pid}.{k}"] = v
            else:
                rest.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": rest}


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value on param's device, in param's memory layout. A file holds contiguous tensors, and the fused AdamW kernel
    walks a parameter and its moments in memory order: a channels-last weight with contiguous moments got other
    elements' moments after a resume (weights off by 0.05 within three steps)."""
    if value.shape != param.shape or value.stride() == param.stride():
        return value.to(param.device)
    return torch.empty_like(param, dtype=value.dtype).copy_(value)  # one copy: the device and the layout at once


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict, device, prefix: str = "optim.") -> None:
    state: dict[int, dict] = {}
    params = [p for g in opt.param_groups for p in g["params"]]  # state_dict's ids count them in this order
    for name, v in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix):].split(".", 1)
            if not pid.isdigit():
                continue  # another optimizer's tensors (optim.<name>.<pid>...)
            if key != "step":
                v = _like(params[int(pid)], v) if int(pid) < len(params) else v.to(device)
            state.setdefault(int(pid), {})[key] = v
    for pid, st in meta["state"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})

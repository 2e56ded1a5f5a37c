"""Optimizers: AdamW or SGD-Nesterov, no weight decay on norms and biases, and a pickle-free state round trip."""

from __future__ import annotations

import torch
from torch import nn

from nnforge.config import EngineConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decaying a norm's scale or a bias only fights the normalisation; decay matrices and kernels alone.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: EngineConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # On CUDA the fused kernel updates every parameter in a few launches instead of several per tensor.
        fused = next(model.parameters()).is_cuda
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8, fused=fused or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'; expected adamw or sgd")


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors named optim.<param>.<key>, JSON for the rest) — no pickle needed to save or load it."""
    sd = opt.state_dict()
    tensors, rest = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                rest.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": rest}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict, device) -> None:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = v.to(device) if key != "step" else v
    for pid, st in meta["state"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})

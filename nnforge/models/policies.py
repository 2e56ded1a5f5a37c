"""Policies and value networks for reinforcement learning (task "rl"): an MLP for vector observations, the
Nature-DQN CNN for stacked pixel frames.

    net = create_model("mlp_policy", obs_shape=[4], n_actions=2)          # PPO actor-critic, CartPole
    logits, value = net.heads(obs)                                         # (B, 2), (B,)
    net(obs)                                                               # (B, 3): what export and serve run

Every network takes the observation exactly as the environment gives it (float32 vectors, or uint8 frames
(B, C, H, W)) and prepares it itself: pixels are scaled to [0, 1]; vectors are normalised by running mean and
variance kept in buffers (`norm_obs=True`), so the statistics travel with the weights into the checkpoint, the
ONNX file and the server. forward() returns one row per observation that outputs.py's "action" kind reads:
[logits, value] (categorical), [mean, value] (gaussian) or [Q-values] (q).

Initialisation follows the PPO/DQN literature: orthogonal weights with gain sqrt(2) in the bodies, 0.01 on the
policy head (a near-uniform first policy) and 1 on the value head.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from nnforge.models.registry import register_model

RL_ARGS = frozenset({"obs_shape", "n_actions", "action_dim", "norm_obs", "log_std_init"})


def _layer(layer: nn.Module, gain: float = math.sqrt(2)) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def _mlp(sizes: list[int], activation: str, out: int, out_gain: float) -> nn.Sequential:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: expected one of {', '.join(_ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [_layer(nn.Linear(a, b)), _ACTIVATIONS[activation]()]
    layers.append(_layer(nn.Linear(sizes[-1], out), out_gain))
    return nn.Sequential(*layers)


class ObsNorm(nn.Module):
    """Running mean and variance of observations (parallel-variance merge of batches); normalises and clips.

    The training loop calls update() between rollouts, so every forward of one rollout and its update sees the
    same statistics."""

    def __init__(self, shape: tuple[int, ...], enabled: bool, clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        self.enabled, self.clip, self.eps = enabled, clip, eps
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, batch: np.ndarray | torch.Tensor) -> None:
        if not self.enabled:
            return
        x = torch.as_tensor(batch, dtype=torch.float64, device=self.mean.device).reshape(-1, *self.mean.shape)
        b_mean, b_var, n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = b_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var.copy_((self.var * self.count + b_var * n + delta**2 * self.count * n / total) / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if not self.enabled:
            return x
        return ((x - self.mean.float()) / torch.sqrt(self.var.float() + self.eps)).clamp(-self.clip, self.clip)


class ActorCritic(nn.Module):
    """A policy and a value function. Discrete actions: logits over n_actions; continuous: a Gaussian with a
    state-independent log standard deviation per dimension."""

    def __init__(self, body_pi: nn.Module, body_v: nn.Module | None, pi_head: nn.Module, v_head: nn.Module,
                 n_actions: int, action_dim: int, log_std_init: float):
        super().__init__()
        self.n_actions, self.action_dim = n_actions, action_dim
        self.body_pi, self.body_v, self.pi_head, self.v_head = body_pi, body_v, pi_head, v_head
        if action_dim:
            self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))

    @property
    def continuous(self) -> bool:
        return self.action_dim > 0

    def prepare(self, obs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - each network defines it
        raise NotImplementedError

    def heads(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, n) or action mean (B, d), value (B,))."""
        x = self.prepare(obs)
        h_pi = self.body_pi(x)
        h_v = self.body_v(x) if self.body_v is not None else h_pi
        return self.pi_head(h_pi), self.v_head(h_v).squeeze(-1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.heads(obs)[1]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, n + 1) [logits, value] or (B, d + 1) [mean, value]: the deterministic policy and its value."""
        out, value = self.heads(obs)
        return torch.cat([out.float(), value.float().unsqueeze(-1)], dim=-1)


class MLPActorCritic(ActorCritic):
    def __init__(self, obs_shape: list[int], n_actions: int = 0, action_dim: int = 0, hidden: list[int] = (64, 64),
                 activation: str = "tanh", norm_obs: bool = False, log_std_init: float = 0.0):
        d = int(np.prod(obs_shape))
        sizes = [d, *hidden]
        out = n_actions or action_dim
        # separate bodies for policy and value (the literature's default for vector observations)
        body_pi = _mlp(sizes[:-1], activation, sizes[-1], math.sqrt(2))
        body_v = _mlp(sizes[:-1], activation, sizes[-1], math.sqrt(2))
        act = _ACTIVATIONS[activation]
        super().__init__(nn.Sequential(body_pi, act()), nn.Sequential(body_v, act()),
                         _layer(nn.Linear(sizes[-1], out), 0.01), _layer(nn.Linear(sizes[-1], 1), 1.0),
                         n_actions, action_dim, log_std_init)
        self.obs_norm = ObsNorm(tuple(obs_shape), norm_obs)

    def prepare(self, obs: torch.Tensor) -> torch.Tensor:
        return self.obs_norm(obs).flatten(1)


def nature_cnn(in_chans: int, size: int) -> tuple[nn.Sequential, int]:
    """Mnih et al. (2015)'s convolutions and 512-unit layer for (in_chans, size, size) frames; (body, 512)."""
    convs = nn.Sequential(_layer(nn.Conv2d(in_chans, 32, 8, stride=4)), nn.ReLU(),
                          _layer(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
                          _layer(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        flat = convs(torch.zeros(1, in_chans, size, size)).shape[1]
    return nn.Sequential(convs, _layer(nn.Linear(flat, 512)), nn.ReLU()), 512


class CNNActorCritic(ActorCritic):
    def __init__(self, obs_shape: list[int], n_actions: int = 0, action_dim: int = 0, log_std_init: float = 0.0):
        c, h, w = obs_shape
        if h != w or h < 36:
            raise ValueError(f"the Nature CNN takes square frames of at least 36 px; got {h}x{w}")
        body, width = nature_cnn(c, h)
        super().__init__(body, None, _layer(nn.Linear(width, n_actions or action_dim), 0.01),
                         _layer(nn.Linear(width, 1), 1.0), n_actions, action_dim, log_std_init)

    def prepare(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.float() / 255.0  # (B, C, H, W) uint8 frames -> [0, 1]


class MLPQ(nn.Module):
    """Q-values of every action from a vector observation."""

    def __init__(self, obs_shape: list[int], n_actions: int, hidden: list[int] = (256, 256),
                 activation: str = "relu"):
        super().__init__()
        self.net = _mlp([int(np.prod(obs_shape)), *hidden], activation, n_actions, 1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # (B, *obs_shape) -> (B, n_actions)
        return self.net(obs.float().flatten(1))


class CNNQ(nn.Module):
    """The Nature DQN: Q-values of every action from stacked uint8 frames (B, C, H, W)."""

    def __init__(self, obs_shape: list[int], n_actions: int):
        super().__init__()
        c, h, w = obs_shape
        if h != w or h < 36:
            raise ValueError(f"the Nature CNN takes square frames of at least 36 px; got {h}x{w}")
        self.body, width = nature_cnn(c, h)
        self.head = _layer(nn.Linear(width, n_actions), 1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(obs.float() / 255.0))


@register_model("mlp_policy", task="rl", input="vector", data_args=RL_ARGS)
def mlp_policy(obs_shape: list[int], n_actions: int = 0, action_dim: int = 0, hidden: list[int] = (64, 64),
               activation: str = "tanh", norm_obs: bool = False, log_std_init: float = 0.0) -> MLPActorCritic:
    """PPO actor-critic for vector observations: separate MLPs for the policy and the value."""
    return MLPActorCritic(list(obs_shape), n_actions, action_dim, list(hidden), activation, norm_obs, log_std_init)


@register_model("cnn_policy", task="rl", input="pixels", data_args=RL_ARGS)
def cnn_policy(obs_shape: list[int], n_actions: int = 0, action_dim: int = 0,
               log_std_init: float = 0.0) -> CNNActorCritic:
    """PPO actor-critic for stacked frames: the Nature CNN shared by a policy head and a value head."""
    return CNNActorCritic(list(obs_shape), n_actions, action_dim, log_std_init)


@register_model("mlp_q", task="rl", input="vector", data_args=RL_ARGS)
def mlp_q(obs_shape: list[int], n_actions: int, hidden: list[int] = (256, 256), activation: str = "relu") -> MLPQ:
    """DQN Q-network for vector observations."""
    return MLPQ(list(obs_shape), n_actions, list(hidden), activation)


@register_model("cnn_q", task="rl", input="pixels", data_args=RL_ARGS)
def cnn_q(obs_shape: list[int], n_actions: int) -> CNNQ:
    """The Nature DQN (Mnih et al. 2015) for stacked frames."""
    return CNNQ(list(obs_shape), n_actions)

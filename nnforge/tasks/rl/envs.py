"""Gymnasium environments for the rl task: one id, the right preprocessing, vector environments, clear errors.

    env = make_env(cfg)                          # one environment, preprocessed as the policy sees it
    envs = make_vec_env(cfg)                     # cfg.envs of them (sync, or async with --async-envs)
    spaces = Spaces.of(envs)                     # observation shape/dtype, action kind and size

Pixel observations (a uint8 (H, W, 3) Box: CarRacing, Atari) become stacked frames (k, S, S) uint8, k =
frame_stack, S = frame_size, gray or (3k, S, S) in colour; Atari goes through gymnasium's AtariPreprocessing (no-op
starts, 4-frame skip with max-pooling, 84 px) first. Vector observations are passed on as they are.

Vector environments use gymnasium 1.x's next-step autoreset: the step after an episode ends returns the reset
observation and ignores its action (its reward is 0). The loops mark that step invalid, so it never enters a
learning target, and the observation stored before it is the episode's real final observation, which a
truncated episode bootstraps from.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from nnforge.config import ConfigError, RLConfig
from nnforge.engine.device import resolve_precision

EXTRA = "pip install 'nnforge[rl]'"  # gymnasium with classic control and Box2D, pygame, ale-py (ROMs included)
try:
    import gymnasium as gym
except ImportError:  # the rl extra is not installed
    raise ConfigError(f"nnforge train rl needs gymnasium: {EXTRA}") from None


def _register_atari(env_id: str) -> None:
    if not env_id.startswith("ALE/"):
        return
    if importlib.util.find_spec("ale_py") is None:
        raise ConfigError(f"env {env_id}: Atari needs the ale-py package (its ROMs ship with it): {EXTRA}")
    import ale_py

    gym.register_envs(ale_py)


def check_env_id(env_id: str) -> gym.envs.registration.EnvSpec:
    """The id's spec, or a ConfigError that says what is wrong and what to install."""
    _register_atari(env_id)
    try:
        return gym.spec(env_id)
    except gym.error.Error as err:  # NameNotFound, VersionNotFound, NamespaceNotFound, ...
        hint = " (Atari ids start with ALE/, e.g. ALE/Pong-v5)" if "/" not in env_id else ""
        raise ConfigError(f"env {env_id!r} is not registered with gymnasium: {err}{hint}") from None


def is_pixels(space: gym.Space) -> bool:
    return (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3
            and space.shape[-1] in (1, 3))


class RepeatAction(gym.Wrapper):
    """Repeat each action `skip` times, summing the rewards (CarRacing's frames change little between steps)."""

    def __init__(self, env: gym.Env, skip: int):
        super().__init__(env)
        self.skip = skip

    def step(self, action):
        total = 0.0
        for _ in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


def _channels_first(env: gym.Env) -> gym.Env:
    """(S, S, 3) -> (3, S, S)."""
    space = env.observation_space
    h, w, c = space.shape
    new = gym.spaces.Box(0, 255, (c, h, w), np.uint8)
    return gym.wrappers.TransformObservation(env, lambda o: np.ascontiguousarray(o.transpose(2, 0, 1)), new)


def _merge_stack(env: gym.Env) -> gym.Env:
    """(k, 3, S, S) -> (3k, S, S): colour frames stacked along the channels."""
    k, c, h, w = env.observation_space.shape
    new = gym.spaces.Box(0, 255, (k * c, h, w), np.uint8)
    return gym.wrappers.TransformObservation(env, lambda o: o.reshape(k * c, h, w), new)


def make_env(cfg: RLConfig, render_mode: str | None = None) -> gym.Env:
    """One environment, preprocessed as the policy sees it."""
    check_env_id(cfg.env)
    if render_mode == "rgb_array":  # pictures off-screen: pygame needs no display (and says so otherwise)
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    atari = cfg.env.startswith("ALE/")
    kwargs = dict(cfg.env_kwargs)
    if atari:
        kwargs.setdefault("frameskip", 1)  # AtariPreprocessing skips frames itself (and max-pools the last two)
    try:
        env = gym.make(cfg.env, render_mode=render_mode, **kwargs)
    except gym.error.DependencyNotInstalled as err:  # Box2D, pygame
        raise ConfigError(f"env {cfg.env} needs a package that is not installed ({err}); {EXTRA}") from None
    except TypeError as err:  # an env_kwargs key the environment does not take
        raise ConfigError(f"env {cfg.env}: env_kwargs {cfg.env_kwargs} were refused ({err})") from None
    try:
        return _preprocess(env, cfg, atari) if is_pixels(env.observation_space) else env
    except gym.error.DependencyNotInstalled as err:  # OpenCV: the frame wrappers' resizing
        raise ConfigError(f"env {cfg.env}: pixel preprocessing needs a package that is not installed ({err}); "
                          f"{EXTRA}") from None


def _preprocess(env: gym.Env, cfg: RLConfig, atari: bool) -> gym.Env:
    """Pixels -> stacked (k, S, S) uint8 frames (gray), or (3k, S, S) in colour."""
    if atari:
        env = gym.wrappers.AtariPreprocessing(env, frame_skip=4, screen_size=cfg.frame_size,
                                              grayscale_obs=cfg.grayscale)
    else:
        if cfg.frame_skip > 1:
            env = RepeatAction(env, cfg.frame_skip)
        if cfg.grayscale:
            env = gym.wrappers.GrayscaleObservation(env, keep_dim=False)
        env = gym.wrappers.ResizeObservation(env, (cfg.frame_size, cfg.frame_size))
    if not cfg.grayscale:
        env = _channels_first(env)
    env = gym.wrappers.FrameStackObservation(env, cfg.frame_stack)  # padding: the reset frame, repeated
    return env if cfg.grayscale else _merge_stack(env)


def make_vec_env(cfg: RLConfig) -> gym.vector.VectorEnv:
    fns = [lambda: make_env(cfg) for _ in range(cfg.envs)]
    mode = gym.vector.AutoresetMode.NEXT_STEP
    if cfg.async_envs:
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


@dataclass
class Spaces:
    """What the networks and the run's io need to know about an environment's spaces."""

    obs_shape: tuple[int, ...]
    obs_dtype: str           # float32 or uint8 (pixels)
    pixels: bool
    n_actions: int           # discrete actions (0 for continuous)
    action_dim: int          # continuous action dimensions (0 for discrete)
    low: list[float] | None  # continuous action bounds
    high: list[float] | None

    @classmethod
    def of(cls, env: gym.Env | gym.vector.VectorEnv, env_id: str) -> Spaces:
        obs = getattr(env, "single_observation_space", env.observation_space)
        act = getattr(env, "single_action_space", env.action_space)
        if not isinstance(obs, gym.spaces.Box):
            raise ConfigError(f"env {env_id}: observation space {obs} is not supported (a Box of numbers is)")
        pixels = obs.dtype == np.uint8 and len(obs.shape) == 3
        if isinstance(act, gym.spaces.Discrete):
            return cls(tuple(obs.shape), "uint8" if pixels else "float32", pixels, int(act.n), 0, None, None)
        if isinstance(act, gym.spaces.Box) and len(act.shape) == 1:
            return cls(tuple(obs.shape), "uint8" if pixels else "float32", pixels, 0, int(act.shape[0]),
                       act.low.astype(float).tolist(), act.high.astype(float).tolist())
        raise ConfigError(f"env {env_id}: action space {act} is not supported (Discrete, or a 1-D Box)")

    def autocast_dtype(self, precision: str, device):
        """The autocast dtype for this environment's networks. "auto" keeps fp32 for vector observations on the
        CPU: their 64-256-unit MLPs cost less than the casts bf16 autocast adds (CartPole PPO trained 1.4x faster in
        fp32 on this project's CPU box, 3 seeds); pixel CNNs and GPUs get bf16 where the device runs it fast."""
        if precision == "auto" and not self.pixels and device.type == "cpu":
            return None
        return resolve_precision(precision, device)

    def io(self, head: str) -> dict:
        """The run's io record: observation in, action out (outputs.py's "action" kind)."""
        out = {"kind": "action", "head": head}
        if self.action_dim:
            out.update(dim=self.action_dim, low=self.low, high=self.high)
        else:
            out["n"] = self.n_actions
        return {"verb": "act", "input": {"kind": "observation", "shape": list(self.obs_shape),
                                         "dtype": self.obs_dtype}, "output": out}


def seeds(base: int, n: int) -> list[int]:
    return [base + i for i in range(n)]


def run_episodes(act, cfg: RLConfig, episodes: int, seed: int, max_steps: int | None = None,
                 parallel: int = 16, observations: list | None = None) -> list[dict]:
    """Play `episodes` episodes with the deterministic policy `act` (a batch of observations -> actions), episode
    i from reset seed `seed + i`, up to `parallel` at once in separate environments; returns, per episode in
    order, its return, length and whether it ended by termination. observations: a list that collects the
    observation batches the policy saw."""
    n = min(episodes, parallel)
    envs = [make_env(cfg) for _ in range(n)]
    out: list[dict | None] = [None] * episodes
    current = list(range(n))  # the episode each environment plays
    obs = [envs[j].reset(seed=seed + j)[0] for j in range(n)]
    ret, length = [0.0] * n, [0] * n
    following = n
    active = list(range(n))
    try:
        while active:
            batch = np.stack([obs[j] for j in active])
            actions = act(batch)
            if observations is not None and len(observations) < 64:  # the first steps' batches are enough
                observations.append(batch)
            still = []
            for a, j in zip(actions, active, strict=True):
                obs[j], r, term, trunc, _ = envs[j].step(a)
                ret[j] += float(r)
                length[j] += 1
                if term or trunc or (max_steps and length[j] >= max_steps):
                    out[current[j]] = {"return": ret[j], "length": length[j], "terminated": bool(term)}
                    if following < episodes:
                        current[j], following = following, following + 1
                        obs[j] = envs[j].reset(seed=seed + current[j])[0]
                        ret[j], length[j] = 0.0, 0
                        still.append(j)
                else:
                    still.append(j)
            active = still
    finally:
        for e in envs:
            e.close()
    return out  # type: ignore[return-value]

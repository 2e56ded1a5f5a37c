"""DQN's replay buffer, bounded in memory: every observation is stored once, and pixel frames once per stack.

    rb = ReplayBuffer(capacity=100_000, n_envs=8, obs_shape=(4, 84, 84), obs_dtype="uint8", stack=4)
    rb.add(obs, actions, rewards, terminated, ended, valid)      # one vector-environment step
    obs, actions, returns, discounts, next_obs = rb.sample(64, gamma=0.99, n_step=3, rng=rng)

The buffer keeps one stream per environment of what each step saw: a transition's next observation is the next
position of the same stream (never a second copy), and for stacked pixel frames only the newest frame of each
observation is kept (uint8), the stack being rebuilt at sampling time exactly as gymnasium's
FrameStackObservation built it (within an episode, the frames before its first one repeat the first). So 100k
Atari/CarRacing transitions take 100k x 84 x 84 bytes = 0.7 GB instead of 5.6 GB.

With next-step autoreset, the position after an episode's last step holds its final observation, and the step
taken there is the reset step (`valid` False): it is never sampled, and a truncated transition bootstraps from
that final observation. n-step returns stop at the first end within n steps; only termination zeroes the
bootstrap.
"""

from __future__ import annotations

import numpy as np


class ReplayBuffer:
    def __init__(self, capacity: int, n_envs: int, obs_shape: tuple[int, ...], obs_dtype: str, stack: int = 1):
        self.size = max(2, -(-capacity // n_envs))  # positions per environment stream
        self.n_envs, self.stack, self.obs_shape = n_envs, stack, tuple(obs_shape)
        channels = obs_shape[0] // stack if stack > 1 else None  # channels of one frame in a stacked observation
        self.frame_shape = (channels, *obs_shape[1:]) if stack > 1 else self.obs_shape
        self.frames = np.zeros((self.size, n_envs, *self.frame_shape), dtype=obs_dtype)
        self.actions = np.zeros((self.size, n_envs), dtype=np.int64)
        self.rewards = np.zeros((self.size, n_envs), dtype=np.float32)
        self.terms = np.zeros((self.size, n_envs), dtype=bool)
        self.ends = np.zeros((self.size, n_envs), dtype=bool)
        self.valid = np.zeros((self.size, n_envs), dtype=bool)
        self.first = np.zeros((self.size, n_envs), dtype=bool)  # the position holds an episode's first observation
        self.t = 0  # positions written per stream

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.frames, self.actions, self.rewards, self.terms, self.ends, self.valid,
                                      self.first))

    def __len__(self) -> int:
        return min(self.t, self.size) * self.n_envs

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terms: np.ndarray, ends: np.ndarray,
            valid: np.ndarray) -> None:
        """One step of every environment: the observation acted on, the action, its reward, whether the step
        terminated / ended the episode, and whether it was a real step (not the autoreset step)."""
        i = self.t % self.size
        self.frames[i] = obs[:, -self.frame_shape[0]:] if self.stack > 1 else obs
        self.actions[i], self.rewards[i], self.terms[i], self.ends[i], self.valid[i] = (
            actions, rewards, terms, ends, valid)
        # after an autoreset step comes a new episode's first observation (and at the very start of the streams)
        self.first[i] = True if self.t == 0 else ~self.valid[(self.t - 1) % self.size]
        self.t += 1

    def observations(self, ts: np.ndarray, envs: np.ndarray) -> np.ndarray:
        """The observations at absolute positions ts of streams envs, stacks rebuilt: (B, *obs_shape)."""
        if self.stack == 1:
            return self.frames[ts % self.size, envs]
        src = [ts]
        for _ in range(self.stack - 1):  # walk back; an episode's first frame repeats into the older slots
            prev = src[-1]
            src.append(np.where(self.first[prev % self.size, envs], prev, prev - 1))
        frames = np.stack([self.frames[s % self.size, envs] for s in reversed(src)], axis=1)  # oldest first
        return frames.reshape(len(ts), *self.obs_shape)

    def sample(self, batch: int, gamma: float, n_step: int, rng: np.random.Generator):
        """(obs, actions, n-step discounted rewards, discount of the bootstrap (0 after termination), next obs)."""
        lo = max(0, self.t - self.size) + self.stack - 1  # the oldest positions may have lost their stack's frames
        hi = self.t - 1 - n_step  # the observation n steps later must be written
        if hi < lo:
            raise ValueError(f"the replay buffer holds {self.t} steps per environment; sampling needs more than "
                             f"{n_step + self.stack}")
        ts = np.empty(0, dtype=np.int64)
        envs = np.empty(0, dtype=np.int64)
        while len(ts) < batch:  # reset steps are rare: draw, keep the real ones, draw again for the rest
            t = rng.integers(lo, hi + 1, size=2 * (batch - len(ts)))
            e = rng.integers(0, self.n_envs, size=len(t))
            keep = self.valid[t % self.size, e]
            ts, envs = np.concatenate([ts, t[keep]])[:batch], np.concatenate([envs, e[keep]])[:batch]
        returns = np.zeros(batch, dtype=np.float32)
        discount = np.ones(batch, dtype=np.float32)
        steps = np.full(batch, n_step)
        alive = np.ones(batch, dtype=bool)  # no end yet within the n steps
        terminated = np.zeros(batch, dtype=bool)
        for k in range(n_step):
            idx = (ts + k) % self.size
            returns += alive * discount * self.rewards[idx, envs]
            ended = alive & self.ends[idx, envs]
            terminated |= alive & self.terms[idx, envs]
            steps[ended] = k + 1
            discount = np.where(alive, discount * gamma, discount)
            alive &= ~ended
        bootstrap = np.where(terminated, 0.0, discount).astype(np.float32)
        return (self.observations(ts, envs), self.actions[ts % self.size, envs], returns, bootstrap,
                self.observations(ts + steps, envs))

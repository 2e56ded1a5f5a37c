"""Deep Q-Networks (Mnih et al. 2015) with double-DQN targets (van Hasselt et al. 2016), in one file: the
algorithm is the loop.

    nnforge train rl --env CartPole-v1 --algo dqn
    nnforge train rl --env ALE/Pong-v5 --algo dqn          # the Nature CNN on 4 stacked 84x84 gray frames

Every environment step: an epsilon-greedy action per environment (epsilon falls linearly from its initial to its
final value over exploration_fraction of the run), the transition into the replay buffer (_replay.py: bounded,
uint8 frames stored once). Every train_freq steps after learning_starts: gradient_steps updates of the Huber
loss between Q(s, a) and the n-step target r + ... + gamma^n Q_target(s', argmax_a' Q(s', a')), zero after
termination (truncation bootstraps from the final observation). Every target_update steps the target network
becomes a copy of the online one (tau 1) or moves towards it by tau (Polyak).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from nnforge.config import ConfigError, RLConfig
from nnforge.engine.device import autocast
from nnforge.engine.run import Run
from nnforge.engine.schedule import lr_at
from nnforge.models import create_model
from nnforge.tasks.rl._recorder import Recorder, log
from nnforge.tasks.rl._replay import ReplayBuffer
from nnforge.tasks.rl.envs import Spaces, make_vec_env

COLUMNS = ["td_loss", "q_mean", "epsilon"]


def policy_record(cfg: RLConfig, spaces: Spaces) -> dict:
    """The model record in every checkpoint: what nnforge.load, export and serve rebuild."""
    if spaces.action_dim:
        raise ConfigError(f"DQN needs discrete actions, and {cfg.env} has continuous ones: use --algo ppo"
                          + (", or --env-kwargs continuous=false" if cfg.env.startswith("CarRacing") else ""))
    name = cfg.policy or ("cnn_q" if spaces.pixels else "mlp_q")
    kwargs = {"obs_shape": list(spaces.obs_shape), "n_actions": spaces.n_actions, **cfg.policy_args}
    return {"model": name, "model_kwargs": kwargs, "module": "q", "io": spaces.io("q"), "algo": "dqn"}


def epsilon_at(step: int, cfg: RLConfig) -> float:
    decay = max(1.0, cfg.exploration_fraction * cfg.steps)
    frac = min(1.0, step / decay)
    return cfg.exploration_initial_eps + frac * (cfg.exploration_final_eps - cfg.exploration_initial_eps)


def train(cfg: RLConfig, run: Run, device: torch.device, resume: bool, record: dict) -> Recorder:
    envs = make_vec_env(cfg)
    spaces = Spaces.of(envs, cfg.env)
    q = create_model(record["model"], **record["model_kwargs"]).to(device)
    q_target = create_model(record["model"], **record["model_kwargs"]).to(device).requires_grad_(False)
    q_target.load_state_dict(q.state_dict())
    channels_last = spaces.pixels and cfg.channels_last and device.type != "mps"
    if channels_last:
        q.to(memory_format=torch.channels_last)
        q_target.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(q.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))
    amp = spaces.autocast_dtype(cfg.precision, device)

    def to_device(obs: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(obs).to(device)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:  # greedy: what export and serve answer
        with autocast(device, amp):
            return q(to_device(obs)).float().argmax(1).cpu().numpy()

    rec = Recorder(cfg, run, device, {"q": q, "q_target": q_target}, {"q": optimizer}, record, COLUMNS, act)
    if resume:
        rec.restore()
    s = rec.state
    N = cfg.envs
    stack = cfg.frame_stack if spaces.pixels else 1
    rb = ReplayBuffer(cfg.buffer_size, N, spaces.obs_shape, spaces.obs_dtype, stack)
    log(f"replay buffer: {cfg.buffer_size} transitions, {rb.nbytes / 2**20:.0f} MiB"
        + (f" (uint8 frames, each stored once; stacks of {stack} rebuilt when sampled)" if stack > 1 else ""))
    rng = np.random.default_rng(rec.env_seed)  # exploration and sampling; a fresh stream after a resume
    start = s.step  # the replay buffer starts empty, also after a resume: learning_starts counts from here
    obs, _ = envs.reset(seed=rec.env_seed)
    prev_end = np.zeros(N, dtype=bool)
    ep_ret, ep_len = np.zeros(N), np.zeros(N, dtype=np.int64)

    with rec.running() as stop:
        while s.step < cfg.steps:
            eps = epsilon_at(s.step, cfg)
            greedy = act(obs)
            explore = rng.random(N) < eps
            actions = np.where(explore, rng.integers(0, spaces.n_actions, size=N), greedy)
            t0 = time.perf_counter()
            next_obs, reward, term, trunc, _ = envs.step(actions)
            rec.env_time += time.perf_counter() - t0
            end = term | trunc
            ep_ret += reward
            ep_len += 1
            done_now = end & ~prev_end
            if done_now.any():
                rec.finished_episodes(ep_ret[done_now], ep_len[done_now])
            ep_ret[end | prev_end], ep_len[end | prev_end] = 0.0, 0
            rb.add(obs, actions, np.sign(reward) if cfg.clip_reward else reward, term, end, ~prev_end)
            obs, prev_end = next_obs, end

            metrics = {"epsilon": eps}
            before, after = s.step, s.step + N
            if after - start >= cfg.learning_starts and after // cfg.train_freq > before // cfg.train_freq:
                lr = lr_at(s.step, cfg.steps, cfg.lr, 0, cfg.schedule)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                losses, q_means = [], []
                for _ in range(cfg.gradient_steps):
                    b_obs, b_act, b_ret, b_disc, b_next = rb.sample(cfg.batch_size, cfg.gamma, cfg.n_step, rng)
                    b_act = torch.from_numpy(b_act).to(device)
                    with torch.no_grad(), autocast(device, amp):
                        next_target = q_target(to_device(b_next)).float()
                        chooser = q(to_device(b_next)).float() if cfg.double_q else next_target
                        best = chooser.argmax(1, keepdim=True)  # double DQN: the online network picks
                        target = (torch.from_numpy(b_ret).to(device)
                                  + torch.from_numpy(b_disc).to(device) * next_target.gather(1, best).squeeze(1))
                    with autocast(device, amp):
                        q_sa = q(to_device(b_obs)).float().gather(1, b_act.unsqueeze(1)).squeeze(1)
                    loss = F.smooth_l1_loss(q_sa, target)  # Huber
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.clip_grad:
                        torch.nn.utils.clip_grad_norm_(q.parameters(), cfg.clip_grad)
                    optimizer.step()
                    losses.append(loss.detach())
                    q_means.append(q_sa.detach().mean())
                    s.updates += 1
                metrics.update(td_loss=float(torch.stack(losses).mean()), q_mean=float(torch.stack(q_means).mean()))
            if after // cfg.target_update > before // cfg.target_update:
                with torch.no_grad():
                    for p_t, p in zip(q_target.parameters(), q.parameters(), strict=True):
                        p_t.lerp_(p, cfg.tau)  # tau 1: a copy
            if rec.after_update(N, metrics):
                break
            if stop.requested:
                rec.interrupt()
    envs.close()
    return rec

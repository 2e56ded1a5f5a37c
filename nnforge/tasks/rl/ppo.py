"""Proximal Policy Optimization (Schulman et al. 2017), in one file: the algorithm is the loop.

    nnforge train rl --env CartPole-v1 --algo ppo
    nnforge train rl --env CarRacing-v3 --algo ppo        # pixels: the Nature CNN on stacked gray frames

Each iteration collects n_steps from every environment with the current policy, computes advantages with GAE,
then runs update_epochs passes of minibatch updates of the clipped objective, the (optionally clipped) value
loss and the entropy bonus. Discrete actions use a categorical policy; continuous ones a Gaussian whose samples
are clipped to the action bounds before they reach the environment (the log-probability is the unclipped
sample's). The learning rate (and, with clip_anneal, the clipping range) falls linearly to 0 over the run.

Gymnasium 1.x's next-step autoreset: when step t ends an episode, the observation stored at t+1 is its real
final observation and step t+1 is the reset step (its action ignored, its reward 0). So a truncated step t
bootstraps from V(obs_{t+1}), a terminated one from nothing, the GAE chain is cut at every end, and reset steps
are masked out of every loss.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from nnforge.config import RLConfig
from nnforge.engine.device import autocast
from nnforge.engine.run import Run
from nnforge.engine.schedule import lr_at
from nnforge.models import create_model
from nnforge.outputs import build_output
from nnforge.tasks.rl._recorder import Recorder, RunningMeanStd
from nnforge.tasks.rl.envs import Spaces, make_vec_env

LOSS_STATS = ["pg_loss", "v_loss", "entropy", "approx_kl", "clip_frac"]  # per minibatch, averaged per update
COLUMNS = [*LOSS_STATS, "explained_variance", "clip_coef"]
LOG_2PI = math.log(2 * math.pi)


def policy_record(cfg: RLConfig, spaces: Spaces) -> dict:
    """The model record in every checkpoint: what nnforge.load, export and serve rebuild."""
    name = cfg.policy or ("cnn_policy" if spaces.pixels else "mlp_policy")
    kwargs = {"obs_shape": list(spaces.obs_shape), "n_actions": spaces.n_actions, "action_dim": spaces.action_dim,
              **({"log_std_init": cfg.log_std_init} if spaces.action_dim else {}),
              **({"norm_obs": True} if cfg.norm_obs and not spaces.pixels else {}), **cfg.policy_args}
    head = "gaussian" if spaces.action_dim else "categorical"
    return {"model": name, "model_kwargs": kwargs, "module": "policy", "io": spaces.io(head), "algo": "ppo"}


def sample(policy: nn.Module, out: torch.Tensor, action: torch.Tensor | None = None):
    """(action, log-probability, entropy) of the policy's distribution; action given: its log-probability."""
    if policy.continuous:  # a diagonal Gaussian with a learned, state-independent log std
        log_std = policy.log_std.expand_as(out)
        if action is None:
            action = out + log_std.exp() * torch.randn_like(out)
        logprob = (-0.5 * ((action - out) / log_std.exp()) ** 2 - log_std - 0.5 * LOG_2PI).sum(-1)
        return action, logprob, (0.5 + 0.5 * LOG_2PI + log_std).sum(-1)
    logp = torch.log_softmax(out.float(), dim=-1)
    if action is None:
        action = torch.multinomial(logp.exp(), 1).squeeze(-1)
    return action, logp.gather(-1, action.long().unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def gae(rewards, values, next_value, terms, ends, gamma: float, lam: float):
    """(advantages, returns) of a rollout, all (T, N) but next_value (N,): V of the observation after the last step.

    terms[t]: step t terminated (nothing to bootstrap); ends[t]: terminated or truncated (the chain is cut). The
    value after step t is values[t + 1]: with next-step autoreset that is V of the episode's final observation,
    which a truncated episode bootstraps from."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        following = next_value if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + gamma * following * (1.0 - terms[t]) - values[t]
        last = delta + gamma * lam * (1.0 - ends[t]) * last
        adv[t] = last
    return adv, adv + values


def train(cfg: RLConfig, run: Run, device: torch.device, resume: bool, record: dict) -> Recorder:
    envs = make_vec_env(cfg)
    spaces = Spaces.of(envs, cfg.env)
    policy = create_model(record["model"], **record["model_kwargs"]).to(device)
    channels_last = spaces.pixels and cfg.channels_last and device.type != "mps"
    if channels_last:
        policy.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))
    amp = spaces.autocast_dtype(cfg.precision, device)
    actions_of = build_output(record["io"]["output"]).actions

    def to_device(obs: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(obs).to(device)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:  # the deterministic policy, exactly as export and serve run it
        return actions_of(policy(to_device(obs)).float().cpu().numpy())

    rec = Recorder(cfg, run, device, {"policy": policy}, {"policy": optimizer}, record, COLUMNS, act)
    if resume:
        rec.restore()
    s = rec.state
    reward_rms = RunningMeanStd(**s.reward_stats) if s.reward_stats else RunningMeanStd()

    T, N = cfg.n_steps, cfg.envs
    # the rollout fills numpy buffers (no tensor op per environment step) and reaches the device once per rollout
    obs_np = np.zeros((T, N, *spaces.obs_shape), dtype=spaces.obs_dtype)
    rew_np, term_np, end_np = (np.zeros((T, N), dtype=np.float32) for _ in range(3))
    valid_np = np.zeros((T, N), dtype=bool)
    next_obs, _ = envs.reset(seed=rec.env_seed)
    prev_end = np.zeros(N, dtype=bool)   # the previous step ended an episode: this step is a reset step
    discounted = np.zeros(N)             # running discounted return per environment, for reward scaling
    ep_ret, ep_len = np.zeros(N), np.zeros(N, dtype=np.int64)
    low = np.asarray(spaces.low, dtype=np.float32) if spaces.action_dim else None
    high = np.asarray(spaces.high, dtype=np.float32) if spaces.action_dim else None

    with rec.running() as stop:
        while s.step < cfg.steps:
            lr = lr_at(s.step, cfg.steps, cfg.lr, 0, cfg.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            clip = cfg.clip_coef * (1.0 - s.step / cfg.steps) if cfg.clip_anneal else cfg.clip_coef

            # --- rollout: n_steps from every environment ---------------------------------------------------
            policy.eval()
            acts, logps, vals = [], [], []
            for t in range(T):
                obs_np[t], valid_np[t] = next_obs, ~prev_end
                with torch.no_grad(), autocast(device, amp):
                    out, value = policy.heads(to_device(next_obs))
                    action, logprob, _ = sample(policy, out.float())
                acts.append(action)
                logps.append(logprob)
                vals.append(value.float())
                a = action.cpu().numpy()
                t0 = time.perf_counter()
                next_obs, reward, term, trunc, _ = envs.step(np.clip(a, low, high) if low is not None else a)
                rec.env_time += time.perf_counter() - t0
                end = term | trunc
                ep_ret += reward
                ep_len += 1
                done_now = end & ~prev_end  # a real episode ended (the reset step itself never ends one)
                if done_now.any():
                    rec.finished_episodes(ep_ret[done_now], ep_len[done_now])
                ep_ret[end | prev_end], ep_len[end | prev_end] = 0.0, 0  # the reset step starts the count afresh
                if cfg.clip_reward:
                    reward = np.sign(reward)
                if cfg.norm_reward:  # scale by the std of the discounted return, as VecNormalize does
                    discounted = discounted * cfg.gamma + reward
                    if not prev_end.all():
                        reward_rms.update(discounted[~prev_end])
                    reward = np.clip(reward / math.sqrt(reward_rms.var + 1e-8), -10, 10)
                    discounted[end] = 0.0
                rew_np[t], term_np[t], end_np[t] = reward, term, end
                prev_end = end
                if stop.requested:  # the partial rollout is dropped; `last` is as of the last update
                    s.reward_stats = vars(reward_rms)
                    rec.interrupt()
            obs_buf = torch.from_numpy(obs_np).to(device)
            act_buf, logp_buf, val_buf = torch.stack(acts), torch.stack(logps), torch.stack(vals)
            rew_buf, term_buf, end_buf = (torch.from_numpy(x).to(device) for x in (rew_np, term_np, end_np))

            # --- advantages -----------------------------------------------------------------------------------
            with torch.no_grad(), autocast(device, amp):
                next_value = policy.value(to_device(next_obs)).float()
            advantages, returns = gae(rew_buf, val_buf, next_value, term_buf, end_buf, cfg.gamma, cfg.gae_lambda)

            # --- update: epochs of minibatches over the valid steps -------------------------------------------
            policy.train()
            valid = torch.from_numpy(valid_np.reshape(-1).nonzero()[0]).to(device)  # the update sees valid steps only
            b_obs = obs_buf.reshape(T * N, *spaces.obs_shape)[valid]
            b_act = act_buf.reshape(T * N, *act_buf.shape[2:])[valid]
            b_logp, b_adv, b_ret, b_val = (x.reshape(-1)[valid] for x in (logp_buf, advantages, returns, val_buf))
            n_valid = len(valid)
            totals = torch.zeros(len(LOSS_STATS), device=device)
            n_mb = 0
            for _epoch in range(cfg.update_epochs):
                # one minibatch holds everything (CartPole's preset): its order cannot matter, so no shuffle/gather
                batches = ([slice(None)] if n_valid <= cfg.batch_size else
                           torch.randperm(n_valid, device=device).split(cfg.batch_size))
                for mb in batches:
                    obs_mb = b_obs[mb]
                    if channels_last:
                        obs_mb = obs_mb.contiguous(memory_format=torch.channels_last)
                    with autocast(device, amp):
                        out, new_value = policy.heads(obs_mb)
                    _, new_logp, entropy = sample(policy, out.float(), b_act[mb])
                    new_value = new_value.float()
                    log_ratio = new_logp - b_logp[mb]
                    ratio = log_ratio.exp()
                    adv = b_adv[mb]
                    if cfg.norm_adv and len(adv) > 1:
                        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
                    if cfg.clip_vloss:
                        clipped = b_val[mb] + (new_value - b_val[mb]).clamp(-clip, clip)
                        v_loss = 0.5 * torch.max((new_value - b_ret[mb]) ** 2, (clipped - b_ret[mb]) ** 2).mean()
                    else:
                        v_loss = 0.5 * ((new_value - b_ret[mb]) ** 2).mean()
                    entropy = entropy.mean()
                    loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.clip_grad:
                        nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip_grad)
                    optimizer.step()
                    with torch.no_grad():  # summed as tensors: no host sync per minibatch
                        approx_kl = ((ratio - 1) - log_ratio).mean()  # the low-variance estimator of KL
                        clip_frac = ((ratio - 1).abs() > clip).float().mean()
                        totals += torch.stack([pg_loss, v_loss, entropy, approx_kl, clip_frac])
                    n_mb += 1
                if cfg.target_kl is not None and float(approx_kl) > cfg.target_kl:
                    break
            s.updates += 1
            if cfg.norm_obs and not spaces.pixels:  # the next rollout and its update see the new statistics
                policy.obs_norm.update(b_obs)
            s.reward_stats = vars(reward_rms)
            y, v = b_ret, b_val
            var_y = float(y.var()) if len(y) > 1 else math.nan
            metrics = dict(zip(LOSS_STATS, (totals / max(1, n_mb)).tolist(), strict=True))
            metrics.update(explained_variance=math.nan if not var_y else 1 - float((y - v).var()) / var_y,
                           clip_coef=clip)
            if not math.isfinite(metrics["explained_variance"]):
                metrics.pop("explained_variance")  # a constant return (every step the same) explains nothing
            if rec.after_update(T * N, metrics):
                break
    envs.close()
    return rec

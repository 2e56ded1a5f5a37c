"""Reinforcement learning side by side with Stable-Baselines3, in one invocation (pip install 'nnforge[rl,bench]').

    python benchmarks/rl.py cartpole-ppo  [--seeds 0 1 2]     # wall time until the evaluation return reaches 475
    python benchmarks/rl.py cartpole-dqn  [--seeds 0 1 2]     # the same with DQN
    python benchmarks/rl.py lunarlander-ppo [--seeds 0 1 2]   # until the evaluation return reaches 200
    python benchmarks/rl.py carracing-ppo --budget-s 1800     # learning curves over a fixed training-time budget
    python benchmarks/rl.py cartpole-ppo --quick              # a smoke run: one seed, a small step cap

Each run is a fresh process (SB3 with rl-zoo's hyper-parameters for the environment, as its authors publish
them; nnforge with its preset, `nnforge train rl --env ID`), seeds interleaved with the order alternating, so
machine drift hits both alike. Both are timed the same way: training wall time from the first environment step,
evaluations excluded. Every `--eval-every` environment steps each evaluates its deterministic policy on 20
episodes (SB3: evaluate_policy, as rl-zoo's EvalCallback does; nnforge: its own evaluation) and stops once the
mean return reaches the target. Printed per run: time and steps to the target, training steps per second, the
process's peak RSS; per environment: the environment loop alone (random actions, the same vector environment
each library trains on) in steps per second, so the share of the environment is visible; and the median of the
paired time ratios nnforge / SB3 (below 1: nnforge is faster).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# rl-zoo's hyperparams/ppo.yml and dqn.yml (rl-baselines3-zoo), "lin_X": linear from X to 0
SB3 = {
    "cartpole-ppo": dict(algo="ppo", env="CartPole-v1", n_envs=8, steps=100_000, target=475.0, kwargs=dict(
        n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0, learning_rate="lin_0.001",
        clip_range="lin_0.2")),
    "cartpole-dqn": dict(algo="dqn", env="CartPole-v1", n_envs=1, steps=50_000, target=475.0, kwargs=dict(
        learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000, gamma=0.99,
        target_update_interval=10, train_freq=256, gradient_steps=128, exploration_fraction=0.16,
        exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[256, 256]))),
    "lunarlander-ppo": dict(algo="ppo", env="LunarLander-v3", n_envs=16, steps=1_000_000, target=200.0, kwargs=dict(
        n_steps=1024, batch_size=64, gae_lambda=0.98, gamma=0.999, n_epochs=4, ent_coef=0.01)),
    "carracing-ppo": dict(algo="ppo", env="CarRacing-v3", n_envs=8, steps=4_000_000, target=None, kwargs=dict(
        batch_size=128, n_steps=512, gamma=0.99, gae_lambda=0.95, n_epochs=10, ent_coef=0.0, sde_sample_freq=4,
        max_grad_norm=0.5, vf_coef=0.5, learning_rate="lin_1e-4", use_sde=True, clip_range=0.2,
        policy_kwargs="carracing")),
}
EVAL_EPISODES = 20
EVAL_SEED = 10_000


def _schedule(value):
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value[4:])
        return lambda progress_remaining: progress_remaining * start
    return value


class FrameSkip:
    """rl-zoo's FrameSkip for CarRacing: each action held for `skip` frames, rewards summed."""

    def __new__(cls, env, skip: int = 2):
        import gymnasium as gym

        class _Skip(gym.Wrapper):
            def step(self, action):
                total = 0.0
                for _ in range(skip):
                    obs, r, term, trunc, info = self.env.step(action)
                    total += float(r)
                    if term or trunc:
                        break
                return obs, total, term, trunc, info

        return _Skip(env)


def sb3_env(task: str, n_envs: int, seed: int):
    """The vector environment rl-zoo trains SB3 on."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack, VecNormalize

    spec = SB3[task]
    if task != "carracing-ppo":
        return make_vec_env(spec["env"], n_envs=n_envs, seed=seed, vec_env_cls=DummyVecEnv)

    def wrap(env):  # rl-zoo's env_wrapper list for CarRacing: skip 2, resize 64, gray (keep the channel axis)
        env = FrameSkip(env, 2)
        env = gym.wrappers.ResizeObservation(env, (64, 64))
        return gym.wrappers.GrayscaleObservation(env, keep_dim=True)

    env = make_vec_env(spec["env"], n_envs=n_envs, seed=seed, wrapper_class=wrap, vec_env_cls=DummyVecEnv)
    env = VecFrameStack(env, 2)
    return VecNormalize(env, norm_obs=False, norm_reward=True)


def run_sb3(task: str, seed: int, eval_every: int, budget_s: float | None, max_steps: int | None,
            threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from stable_baselines3 import DQN, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy

    spec = SB3[task]
    kwargs = {k: _schedule(v) for k, v in spec["kwargs"].items()}
    if kwargs.get("policy_kwargs") == "carracing":
        kwargs["policy_kwargs"] = dict(log_std_init=-2, ortho_init=False, activation_fn=torch.nn.GELU,
                                       net_arch=dict(pi=[256], vf=[256]))
    env = sb3_env(task, spec["n_envs"], seed)
    eval_env = sb3_env(task, 5, seed + EVAL_SEED)
    if task == "carracing-ppo":
        eval_env.training, eval_env.norm_reward = False, False
    cls = PPO if spec["algo"] == "ppo" else DQN
    policy = "CnnPolicy" if task == "carracing-ppo" else "MlpPolicy"
    model = cls(policy, env, seed=seed, verbose=0, device="cpu", **kwargs)
    curve: list[dict] = []

    class Clock(BaseCallback):
        """Training time without evaluations; evaluate every eval_every steps; stop at the target or budget."""

        def _on_training_start(self):
            self.t0, self.paused, self.next_eval = time.perf_counter(), 0.0, eval_every

        def _on_step(self) -> bool:
            over = budget_s is not None and time.perf_counter() - self.t0 - self.paused >= budget_s
            if self.num_timesteps < self.next_eval and not over:
                return True
            self.next_eval += eval_every
            t_eval = time.perf_counter()
            train_s = t_eval - self.t0 - self.paused
            mean, std = evaluate_policy(self.model, eval_env, n_eval_episodes=EVAL_EPISODES, deterministic=True)
            self.paused += time.perf_counter() - t_eval
            curve.append({"step": self.num_timesteps, "time_s": train_s, "eval_return": float(mean)})
            print(f"  sb3 {task} seed {seed}: step {self.num_timesteps} return {mean:.1f} ± {std:.1f} "
                  f"({train_s:.1f} s)", file=sys.stderr, flush=True)
            reached = spec["target"] is not None and mean >= spec["target"]
            return not (reached or (budget_s is not None and train_s >= budget_s))

    model.learn(total_timesteps=max_steps or spec["steps"], callback=Clock())
    return {"curve": curve}


def run_nnforge(task: str, seed: int, eval_every: int, budget_s: float | None, max_steps: int | None) -> dict:
    import nnforge

    spec = SB3[task]
    overrides = dict(env=spec["env"], algo=spec["algo"], seed=seed, eval_every=eval_every,
                     eval_episodes=EVAL_EPISODES, target_return=spec["target"], max_time_s=budget_s)
    if max_steps:
        overrides["steps"] = max_steps
    run = nnforge.train("rl", out=tempfile.mkdtemp(prefix="nnforge-rl-bench-"), **overrides)
    rows = list(csv.DictReader((run.path / "metrics.csv").open()))
    curve = [{"step": int(r["step"]), "time_s": float(r["time_s"]), "eval_return": float(r["eval_return"])}
             for r in rows if r["eval_return"] not in ("", "nan")]
    return {"curve": curve, "run": str(run.path)}


def env_loop_sps(task: str, which: str, steps: int) -> float:
    """Steps per second of the training vector environment alone, random actions."""
    import numpy as np

    spec = SB3[task]
    if which == "sb3":
        env = sb3_env(task, spec["n_envs"], 0)
        env.reset()
        act = lambda: np.array([env.action_space.sample() for _ in range(env.num_envs)])  # noqa: E731
        step = env.step
    else:
        from nnforge.config import RLConfig
        from nnforge.tasks.rl.envs import make_vec_env

        env = make_vec_env(RLConfig(env=spec["env"], algo=spec["algo"]))
        env.reset(seed=0)
        act = env.action_space.sample
        step = env.step
    n = env.num_envs
    t0 = time.perf_counter()
    for _ in range(max(1, steps // n)):
        step(act())
    return steps / (time.perf_counter() - t0)


def worker(a) -> None:
    """One measured run in this process; prints one JSON line."""
    if a.which == "sb3":
        result = run_sb3(a.task, a.seed, a.eval_every, a.budget_s, a.max_steps, a.sb3_threads)
    else:
        result = run_nnforge(a.task, a.seed, a.eval_every, a.budget_s, a.max_steps)
    print("RESULT " + json.dumps(result), flush=True)


def timed(cmd: list[str]) -> tuple[dict, float, float]:
    """(the worker's result, wall seconds, peak RSS MB) of one process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {status}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:]), time.perf_counter() - t0, usage.ru_maxrss / 1024


def first_reaching(curve: list[dict], target: float | None) -> dict | None:
    return next((c for c in curve if target is not None and c["eval_return"] >= target), None)


def main_compare(a) -> None:
    spec = SB3[a.task]
    results: dict[str, list[dict]] = {"sb3": [], "nnforge": []}
    for i, seed in enumerate(a.seeds):
        for which in (("sb3", "nnforge") if i % 2 == 0 else ("nnforge", "sb3")):
            cmd = [sys.executable, __file__, "worker", which, a.task, str(seed), "--eval-every", str(a.eval_every)]
            cmd += ["--budget-s", str(a.budget_s)] if a.budget_s else []
            cmd += ["--max-steps", str(a.max_steps)] if a.max_steps else []
            cmd += ["--sb3-threads", str(a.sb3_threads)] if a.sb3_threads else []
            res, wall, rss = timed(cmd)
            hit = first_reaching(res["curve"], spec["target"])
            last = res["curve"][-1] if res["curve"] else {"step": 0, "time_s": 0.0, "eval_return": float("nan")}
            res.update(seed=seed, wall_s=wall, rss_mb=rss, hit=hit, last=last,
                       sps=last["step"] / max(last["time_s"], 1e-9))
            results[which].append(res)
            shown = (f"reached {spec['target']:g} at step {hit['step']} after {hit['time_s']:.1f} s" if hit else
                     f"best {max((c['eval_return'] for c in res['curve']), default=float('nan')):.1f}")
            print(f"seed {seed} {which:8s}: {shown}; {res['sps']:.0f} steps/s; process {wall:.0f} s, "
                  f"peak RSS {rss:.0f} MB", flush=True)
    env_steps = 2000 if a.quick else 20_000
    loops = {w: env_loop_sps(a.task, w, env_steps) for w in ("sb3", "nnforge")}
    threads = f"SB3 with {a.sb3_threads} torch thread(s)" if a.sb3_threads else "SB3 with torch's default threads"
    print(f"\n== {a.task}: {spec['env']}, {len(a.seeds)} seed(s), evaluation every {a.eval_every} steps on "
          f"{EVAL_EPISODES} deterministic episodes; {threads} ==")
    for which, rs in results.items():
        times = [r["hit"]["time_s"] for r in rs if r["hit"]]
        steps = [r["hit"]["step"] for r in rs if r["hit"]]
        reached = f"{len(times)}/{len(rs)} reached the target" if spec["target"] is not None else "budget runs"
        med = f"; median {statistics.median(times):.1f} s, {statistics.median(steps):.0f} steps" if times else ""
        print(f"{which:8s}: {reached}{med}; training {statistics.median(r['sps'] for r in rs):.0f} steps/s, "
              f"environment loop alone {loops[which]:.0f} steps/s; peak RSS {max(r['rss_mb'] for r in rs):.0f} MB")
    pairs = [(n["hit"]["time_s"], s["hit"]["time_s"]) for n, s in zip(results["nnforge"], results["sb3"],
                                                                      strict=True) if n["hit"] and s["hit"]]
    if pairs:
        ratios = sorted(n / s for n, s in pairs)
        print(f"nnforge / SB3 time to the target: median of {len(ratios)} paired ratios {statistics.median(ratios):.2f}"
              f" (range {ratios[0]:.2f}-{ratios[-1]:.2f}); below 1: nnforge is faster")
    if spec["target"] is None:  # learning curves at fixed training times
        marks = [a.budget_s * f for f in (0.25, 0.5, 0.75, 1.0)] if a.budget_s else []
        for which, rs in results.items():
            for r in rs:
                at = [max((c["eval_return"] for c in r["curve"] if c["time_s"] <= m), default=float("nan"))
                      for m in marks]
                print(f"{which:8s} seed {r['seed']}: best return by " +
                      ", ".join(f"{m / 60:.0f} min {v:.0f}" for m, v in zip(marks, at, strict=True)))
    if a.json:
        Path(a.json).write_text(json.dumps({"task": a.task, "results": results, "env_loop_sps": loops}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for task in SB3:
        c = sub.add_parser(task)
        c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        c.add_argument("--eval-every", type=int, default=None, help="environment steps between evaluations")
        c.add_argument("--budget-s", type=float, default=1800.0 if task == "carracing-ppo" else None,
                       help="training seconds per run (evaluations excluded)")
        c.add_argument("--max-steps", type=int, help="cap on environment steps (default: rl-zoo's n_timesteps)")
        c.add_argument("--quick", action="store_true", help="smoke run: seed 0 only and a small step cap")
        c.add_argument("--json", help="also write every figure to this file")
        c.add_argument("--sb3-threads", type=int, help="torch threads for SB3 (default: torch's, as SB3 and rl-zoo "
                       "leave it; nnforge uses 1 for MLP policies on the CPU): 1 shows SB3 without thread hand-offs")
    w = sub.add_parser("worker")
    w.add_argument("which", choices=["sb3", "nnforge"])
    w.add_argument("task", choices=list(SB3))
    w.add_argument("seed", type=int)
    w.add_argument("--eval-every", type=int, required=True)
    w.add_argument("--budget-s", type=float)
    w.add_argument("--max-steps", type=int)
    w.add_argument("--sb3-threads", type=int)
    a = p.parse_args()
    if a.cmd == "worker":
        worker(a)
        return
    a.task = a.cmd
    default_eval = {"cartpole-ppo": 2048, "cartpole-dqn": 2000, "lunarlander-ppo": 32768, "carracing-ppo": 65536}
    a.eval_every = a.eval_every or default_eval[a.task]
    if a.quick:  # CarRacing: one rl-zoo rollout (8 x 512 steps) and its 10 epochs, then one evaluation
        a.seeds = a.seeds[:1]
        a.max_steps = a.max_steps or {"carracing-ppo": 4096, "lunarlander-ppo": 32768}.get(a.task, 8192)
        if a.task == "carracing-ppo":
            a.budget_s, a.eval_every = 60.0, 4096
    main_compare(a)


if __name__ == "__main__":
    main()

"""The rl task: agents that learn by acting in a gymnasium environment, with PPO (ppo.py) or DQN (dqn.py).

    nnforge train rl --env CartPole-v1 [--algo ppo|dqn] [--steps 200k] [--envs 8] [--config ppo.yaml]
    nnforge evaluate runs/rl/exp1 [--episodes 20]     # mean ± std return, lengths, success rate, report.html
    nnforge play runs/rl/exp1 [--out episode.gif]     # one rendered episode
    nnforge export runs/rl/exp1                       # the policy, observation normalisation included
    nnforge serve runs/rl/exp1                        # POST /v1/act {"observation": [...]}

The algorithm is its own loop, so build() hands the shared run (tasks/base.py: folder, lock, config.yaml,
meta.json) a train callable instead of a Trainable; the loops use the engine's checkpoints, progress, seeding
and stop handling (_recorder.py). A run records its policy as any task records its model: registered network
and arguments (models/policies.py), and io {verb: act, input: observation, output: action}, so nnforge.load,
export and the server use it without importing this package. Presets: presets/*.yaml (config.py applies them).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from nnforge.config import ConfigError, RLConfig, build_config, read_yaml_mapping
from nnforge.data.inputs import ObservationInput
from nnforge.engine.checkpoint import load_checkpoint
from nnforge.engine.run import Run
from nnforge.evaluation.report import write_report
from nnforge.inference import Loaded
from nnforge.tasks.base import Built
from nnforge.tasks.rl.envs import Spaces, check_env_id, make_env, run_episodes

TEST_SEED = 20_000  # `nnforge evaluate` plays episodes from seed + TEST_SEED + i: not those evaluated in training
PARITY_OBSERVATIONS = 256  # real observations kept in the run for the export's parity check


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_config(run: Run) -> RLConfig:
    return build_config(RLConfig, read_yaml_mapping(run.path / "config.yaml"))


class RLTask:
    name = "rl"
    configs = {"rl": RLConfig}

    def build(self, cfg: RLConfig, run: Run, device: torch.device) -> Built:
        refused = [f for f in ("ema", "compile", "early_stop") if getattr(cfg, f)]
        if refused:
            raise ConfigError(f"{', '.join(refused)}: not used by rl (stop early with target_return)")
        if cfg.steps < 1 or cfg.envs < 1:
            raise ConfigError(f"steps {cfg.steps}, envs {cfg.envs}: expected at least 1 each")
        spec = check_env_id(cfg.env)
        env = make_env(cfg)
        spaces = Spaces.of(env, cfg.env)
        env.close()
        if spaces.pixels and cfg.norm_obs:
            raise ConfigError("norm_obs: pixel observations are scaled to [0, 1] by the CNN; set norm_obs false")
        from nnforge.tasks.rl import dqn, ppo

        algo = ppo if cfg.algo == "ppo" else dqn
        record = algo.policy_record(cfg, spaces)  # what nnforge.load rebuilds; in meta.json and every checkpoint
        if cfg.algo == "ppo" and cfg.batch_size > cfg.n_steps * cfg.envs:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than a rollout (n_steps {cfg.n_steps} x envs "
                              f"{cfg.envs}); lower it")
        meta = {"env": cfg.env, "algo": cfg.algo, "preset": cfg.preset, "reward_threshold": spec.reward_threshold,
                "observation": {"shape": list(spaces.obs_shape), "dtype": spaces.obs_dtype, "pixels": spaces.pixels},
                "action": {"n": spaces.n_actions} if spaces.n_actions else
                          {"dim": spaces.action_dim, "low": spaces.low, "high": spaces.high},
                "monitor_mode": "max", **record}
        actions = f"{spaces.n_actions} actions" if spaces.n_actions else f"{spaces.action_dim}-D actions"
        log(f"{cfg.algo} on {cfg.env} (preset {cfg.preset}): observations {list(spaces.obs_shape)} {spaces.obs_dtype}"
            f", {actions}, {cfg.envs} {'async' if cfg.async_envs else 'sync'} environments, {cfg.steps} steps")
        return Built(None, meta, evaluate_after=False,
                     train=lambda resume: self._train(algo, cfg, run, device, resume, record, spaces.pixels))

    def _train(self, algo, cfg: RLConfig, run: Run, device: torch.device, resume: bool, record: dict,
               pixels: bool) -> None:
        from nnforge.tasks.rl.report import curves_section

        threads = torch.get_num_threads()
        if device.type == "cpu" and not pixels:
            torch.set_num_threads(1)  # tiny MLPs: thread hand-offs cost more than the arithmetic
        try:
            rec = algo.train(cfg, run, device, resume, record)
        finally:
            torch.set_num_threads(threads)
        s = rec.state
        log(f"trained {s.step} steps in {s.time_s:.1f} s ({s.step / max(s.time_s, 1e-9):.0f} steps/s; environments "
            f"alone {s.step / max(s.env_time_s, 1e-9):.0f}/s); best evaluation return {s.best:.2f} at step "
            f"{s.best_step}; checkpoints in {run.checkpoints}")
        curves_section(run, cfg.algo)
        self.evaluate(run, device=cfg.device, episodes=cfg.eval_episodes)

    def evaluate(self, run: Run, data: str | None = None, device: str = "auto", episodes: int | None = None,
                 seed: int | None = None) -> dict:
        """Deterministic episodes with the best policy, through the same model and output kind that serve uses."""
        from nnforge.tasks.rl.report import curves_section, episodes_section

        if data is not None:
            raise ConfigError("an rl run is evaluated in its environment; --data is not used (--episodes is)")
        episodes = 20 if episodes is None else episodes
        if episodes < 1:
            raise ConfigError(f"--episodes {episodes}: expected at least 1")
        cfg = run_config(run)
        which = "best" if run.checkpoint("best").is_file() else "last"  # interrupted before its first evaluation
        loaded = Loaded(run.path, which=which, device=device)
        seed = cfg.seed + TEST_SEED if seed is None else seed
        seen: list[np.ndarray] = []
        results = run_episodes(lambda obs: loaded.output.actions(loaded.forward(obs)), cfg, episodes, seed,
                               observations=seen)
        returns = np.array([e["return"] for e in results])
        lengths = np.array([e["length"] for e in results])
        threshold = check_env_id(cfg.env).reward_threshold
        state = load_checkpoint(run.checkpoint(which))[1].get("task_state", {})
        report = {"split": "episodes", "return_mean": float(returns.mean()), "return_std": float(returns.std()),
                  "length_mean": float(lengths.mean()), "length_std": float(lengths.std()),
                  "return_min": float(returns.min()), "return_max": float(returns.max()),
                  "env": cfg.env, "algo": cfg.algo, "episodes": episodes, "seed": seed, "checkpoint": which,
                  "step": state.get("step"),
                  "terminated_rate": float(np.mean([e["terminated"] for e in results])),
                  "reward_threshold": threshold,
                  "success_rate": None if threshold is None else float((returns >= threshold).mean())}
        run.write_json("eval/report.json", report)
        run.write_json("eval/episodes.json", results)
        obs = np.concatenate(seen)
        keep = np.linspace(0, len(obs) - 1, min(PARITY_OBSERVATIONS, len(obs))).astype(int)
        np.save(run.path / ObservationInput.RECORDED, obs[keep].astype(loaded.io["input"]["dtype"]))
        success = "" if threshold is None else f", success {100 * report['success_rate']:.0f}% (≥ {threshold:g})"
        log(f"evaluate: return {report['return_mean']:.2f} ± {report['return_std']:.2f} over {episodes} episodes, "
            f"length {report['length_mean']:.0f}{success}")
        if not (run.eval_dir / "section_curves.html").is_file():
            curves_section(run, cfg.algo)
        episodes_section(run, report, results)
        log(f"report: {write_report(run.path)}")
        return report

    def play(self, run: Run, out: str | None = None, seed: int | None = None, max_steps: int | None = None,
             device: str = "auto") -> dict:
        """Render one episode of the best policy to an animated GIF (default RUN/eval/episode.gif)."""
        from pathlib import Path

        from nnforge.tasks.rl.report import write_gif

        cfg = run_config(run)
        loaded = Loaded(run.path, which="best" if run.checkpoint("best").is_file() else "last", device=device)
        env = make_env(cfg, render_mode="rgb_array")
        path = Path(out) if out else run.eval_dir / "episode.gif"
        if path.suffix.lower() != ".gif":
            raise ConfigError(f"--out {path}: expected a .gif file name")
        seed = cfg.seed + TEST_SEED if seed is None else seed
        obs, _ = env.reset(seed=seed)
        frames, total, steps, terminated = [env.render()], 0.0, 0, False
        try:
            while True:
                action = loaded.output.actions(loaded.forward(obs[None]))[0]
                obs, r, terminated, truncated, _ = env.step(action)
                total, steps = total + float(r), steps + 1
                frames.append(env.render())
                if terminated or truncated or (max_steps and steps >= max_steps):
                    break
            fps = float(env.metadata.get("render_fps") or 30)
        finally:
            env.close()
        write_gif(frames, path, fps)
        log(f"play: return {total:.2f} in {steps} steps ({'terminated' if terminated else 'stopped'}); {path}")
        if path == run.eval_dir / "episode.gif" and (run.eval_dir / "episodes.json").is_file():
            from nnforge.tasks.rl.report import episodes_section  # the report shows the episode from now on

            episodes_section(run, run.read_json("eval/report.json"), run.read_json("eval/episodes.json"))
            write_report(run.path)
        return {"out": str(path), "return": total, "length": steps, "terminated": bool(terminated), "seed": seed}


TASK = RLTask()

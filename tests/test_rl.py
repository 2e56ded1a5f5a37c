"""Reinforcement learning on real gymnasium environments: PPO and DQN learn CartPole, bootstrap right on
truncation and never on termination, resume after SIGTERM, export a policy whose ONNX actions match PyTorch's,
serve POST /v1/act, evaluate deterministically, and drive CarRacing from pixels.

    .venv/bin/pytest tests/test_rl.py -q
"""

from __future__ import annotations

import json
import os
import signal

import gymnasium as gym
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import serving_in_thread
from gymnasium.envs.classic_control import CartPoleEnv
from PIL import Image

import nnforge
from nnforge.cli import main
from nnforge.config import ConfigError, RLConfig, build_config
from nnforge.data.inputs import InputError, build_input
from nnforge.engine.checkpoint import load_checkpoint
from nnforge.engine.errors import TrainingInterrupted
from nnforge.outputs import build_output
from nnforge.tasks.rl._replay import ReplayBuffer
from nnforge.tasks.rl.envs import run_episodes
from nnforge.tasks.rl.ppo import gae

QUIET = dict(eval_episodes=5, log_every=1024)


# ---------------------------------------------------------------------------------------------------------------
# hand-made environments


class TwoEndings(gym.Env):
    """Reward 1 every step; the observation says which of two endings the episode has after 3 steps: [0] is
    truncated (a time limit: the value is 1 / (1 - gamma)), [1] terminates (nothing follows)."""

    observation_space = gym.spaces.Box(-1.0, 2.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.variant, self.t = int(self.np_random.integers(2)), 0
        return np.array([self.variant], np.float32), {}

    def step(self, action):
        self.t += 1
        end = self.t >= 3
        return np.array([self.variant], np.float32), 1.0, end and self.variant == 1, end and self.variant == 0, {}


class Frames(gym.Env):
    """6x6 uint8 frames whose pixels encode (episode, step); episodes of random length 1 to 5, terminated or
    truncated at random: a stream to check the replay buffer's frame stacks and n-step returns against."""

    observation_space = gym.spaces.Box(0, 255, (6, 6), np.uint8)
    action_space = gym.spaces.Discrete(2)
    episode = 0

    def _frame(self):
        frame = np.zeros((6, 6), np.uint8)
        frame[0], frame[1] = self.id % 256, self.t
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        Frames.episode += 1
        self.id, self.t, self.length = Frames.episode, 0, int(self.np_random.integers(1, 6))
        return self._frame(), {}

    def step(self, action):
        self.t += 1
        end = self.t >= self.length
        cut = end and bool(self.np_random.integers(2))
        return self._frame(), float(self.t), end and not cut, cut, {}


KILL_AT: list[int] = []  # environment steps after which KillSwitchCartPole sends SIGTERM to this process


class KillSwitchCartPole(CartPoleEnv):
    """CartPole that sends the real SIGTERM once the process has taken KILL_AT[0] steps in it."""

    steps = 0

    def step(self, action):
        KillSwitchCartPole.steps += 1
        if KILL_AT and KillSwitchCartPole.steps == KILL_AT[0]:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().step(action)


gym.register("nnforge-test/TwoEndings-v0", entry_point=TwoEndings)
gym.register("nnforge-test/KillSwitchCartPole-v0", entry_point=KillSwitchCartPole, max_episode_steps=500)


def random_return(env: str, episodes: int = 10) -> float:
    cfg = RLConfig(env=env)
    rng = np.random.default_rng(0)
    results = run_episodes(lambda obs: rng.integers(0, 2, size=len(obs)), cfg, episodes, seed=20_000)
    return float(np.mean([e["return"] for e in results]))


def eval_returns(run) -> list[float]:
    return [float(r["eval_return"]) for r in run.read_metrics() if r["eval_return"] not in ("", "nan")]


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
    """A PPO CartPole run with observation normalisation, shared by the export, serve and evaluate tests."""
    out = tmp_path_factory.mktemp("rl")
    return nnforge.train("rl", env="CartPole-v1", steps=8192, norm_obs=True, eval_every=4096, out=str(out),
                         name="ppo", **QUIET)


# ---------------------------------------------------------------------------------------------------------------
# learning


def test_ppo_learns_cartpole_past_a_random_policy(cartpole):
    baseline = random_return("CartPole-v1")
    assert 10 < baseline < 40  # CartPole-v1's random policy lasts about 22 steps
    meta = cartpole.meta
    assert meta["task"] == "rl" and meta["preset"] == "ppo_classic" and meta["io"]["verb"] == "act"
    assert max(eval_returns(cartpole)) > 3 * baseline
    rows = cartpole.read_metrics()
    for col in ("episode_return", "episode_length", "pg_loss", "v_loss", "entropy", "approx_kl", "clip_frac",
                "explained_variance", "sps", "env_sps", "time_s"):
        assert col in rows[0], col
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[-1] >= 8192
    # the observation statistics live in the policy: saved with it, so export and serve normalise the same way
    tensors, _ = load_checkpoint(cartpole.path / "checkpoints" / "best.safetensors")
    assert tensors["policy.obs_norm.count"].item() > 1000 and tensors["policy.obs_norm.var"].min() > 0


def test_dqn_learns_cartpole_past_a_random_policy(tmp_path):
    run = nnforge.train("rl", env="CartPole-v1", algo="dqn", steps=4000, eval_every=2000, out=str(tmp_path),
                        name="dqn", **QUIET)
    assert run.meta["preset"] == "dqn_classic" and run.meta["io"]["output"]["head"] == "q"
    assert max(eval_returns(run)) > 3 * random_return("CartPole-v1")
    rows = run.read_metrics()
    assert {"td_loss", "q_mean", "epsilon"} <= set(rows[0])
    eps = [float(r["epsilon"]) for r in rows]
    assert eps[0] > eps[-1] and eps[-1] == pytest.approx(0.04)  # the schedule falls to its final value


def test_gae_bootstraps_from_the_final_observation_only_when_truncated():
    # one environment, 4 steps: a step, an end (step 1), the autoreset step (2: reward 0), a step of the new episode
    values = torch.tensor([[10.0], [20.0], [30.0], [40.0]])  # V(obs_t); obs_2 is the episode's final observation
    rewards = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
    ends = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    for terminated, after_end in ((0.0, 30.0), (1.0, 0.0)):  # truncated: bootstrap from V(final obs) = 30
        terms = torch.tensor([[0.0], [terminated], [0.0], [0.0]])
        _, returns = gae(rewards, values, torch.tensor([50.0]), terms, ends, gamma=0.5, lam=1.0)
        assert returns[1, 0].item() == pytest.approx(1 + 0.5 * after_end)
        assert returns[0, 0].item() == pytest.approx(1 + 0.5 * (1 + 0.5 * after_end))
        assert returns[3, 0].item() == pytest.approx(1 + 0.5 * 50.0)  # the new episode: nothing from the old one


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_truncation_bootstraps_and_termination_does_not(tmp_path, algo):
    """gamma 0.5, reward 1 per step: a truncated episode's state is worth 1 / (1 - gamma) = 2; in the terminating
    variant the three positions look alike, so the learnt value is their average (Monte Carlo for PPO with
    lambda 1: (1.75 + 1.5 + 1) / 3; one-step Q-learning: the fixed point of Q = (2 (1 + Q / 2) + 1) / 3 = 1.5).
    Counting the autoreset step (reward 0) or truncation as an end would pull the first value below 2."""
    common = dict(env="nnforge-test/TwoEndings-v0", algo=algo, gamma=0.5, lr=3e-3, schedule="constant",
                  eval_every=0, eval_episodes=1, out=str(tmp_path), name=algo, envs=4)
    if algo == "ppo":
        run = nnforge.train("rl", steps=6144, n_steps=32, batch_size=64, update_epochs=4, gae_lambda=1.0,
                            async_envs=True, **common)  # the worker processes' autoreset is the same
        expected = [2.0, (1.75 + 1.5 + 1.0) / 3]
    else:
        run = nnforge.train("rl", steps=4000, learning_starts=200, train_freq=4, gradient_steps=2, batch_size=64,
                            target_update=100, exploration_fraction=0.5, policy_args={"hidden": [32, 32]},
                            **common)
        expected = [2.0, 1.5]
    raw = nnforge.load(run).forward(np.array([[0.0], [1.0]], np.float32))
    learnt = raw[:, -1] if algo == "ppo" else raw.mean(1)  # PPO: the value column; DQN: Q of either action
    np.testing.assert_allclose(learnt, expected, atol=0.12)


def test_replay_buffer_rebuilds_frame_stacks_and_n_step_returns():
    """The buffer keeps only the newest frame of each observation; what it rebuilds must be what gymnasium's
    FrameStackObservation gave, across next-step autoresets, and its n-step returns what the rewards add up to."""
    stack, n_envs, gamma, n = 3, 2, 0.9, 3
    envs = gym.vector.SyncVectorEnv([lambda: gym.wrappers.FrameStackObservation(Frames(), stack)] * n_envs,
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    rb = ReplayBuffer(40 * n_envs, n_envs, (stack, 6, 6), "uint8", stack)
    obs, _ = envs.reset(seed=0)
    seen, rewards, terms, ends, valids = [], [], [], [], []
    prev_end = np.zeros(n_envs, bool)
    for _ in range(60):  # more than the buffer holds: the oldest positions are overwritten
        nxt, r, term, trunc, _ = envs.step(np.zeros(n_envs, np.int64))
        rb.add(obs, np.zeros(n_envs, np.int64), r, term, term | trunc, ~prev_end)
        seen.append(obs)
        rewards.append(r)
        terms.append(term)
        ends.append(term | trunc)
        valids.append(~prev_end)
        obs, prev_end = nxt, term | trunc
    seen = np.stack(seen)  # (60, n_envs, stack, 6, 6)
    ts = np.repeat(np.arange(rb.t - rb.size + stack - 1, rb.t), n_envs)
    es = np.tile(np.arange(n_envs), len(ts) // n_envs)
    np.testing.assert_array_equal(rb.observations(ts, es), seen[ts, es])
    o, _, returns, disc, nxt = rb.sample(256, gamma, n, np.random.default_rng(0))
    for i in range(len(o)):  # find each sample in the stream and add its rewards up by hand
        t, e = next((t, e) for t in range(len(seen)) for e in range(n_envs)
                    if valids[t][e] and np.array_equal(seen[t, e], o[i]))
        g, k, boot = 0.0, 0, 1.0
        while True:
            g += gamma**k * rewards[t + k][e]
            k += 1
            if ends[t + k - 1][e] or k == n:
                boot = 0.0 if terms[t + k - 1][e] else gamma**k
                break
        assert returns[i] == pytest.approx(g, rel=1e-5) and disc[i] == pytest.approx(boot, rel=1e-5)
        np.testing.assert_array_equal(nxt[i], seen[t + k, e])  # after an end: the final observation


# ---------------------------------------------------------------------------------------------------------------
# resume, evaluate, play, export, serve


def test_resume_after_sigterm_continues_the_same_learning_curve(tmp_path):
    common = dict(env="nnforge-test/KillSwitchCartPole-v0", steps=6144, eval_every=2048, log_every=1024,
                  eval_episodes=3, out=str(tmp_path))
    straight = nnforge.train("rl", name="straight", **common)
    KillSwitchCartPole.steps = 0
    KILL_AT.append(3500)  # training and evaluation steps in this environment: mid-run, mid-rollout
    try:
        with pytest.raises(TrainingInterrupted, match="--resume"):
            nnforge.train("rl", name="cut", **common)
    finally:
        KILL_AT.clear()
    cut = tmp_path / "rl" / "cut"
    state = load_checkpoint(cut / "checkpoints" / "last.safetensors")[1]["task_state"]
    assert 0 < state["step"] < 6144 and state["step"] % 256 == 0  # as of the last update (8 x 32 steps each)
    before = nnforge.engine.run.Run(cut).read_metrics()
    nnforge.train("rl", resume=str(cut))
    after = nnforge.engine.run.Run(cut).read_metrics()
    deterministic = ("step", "lr", "episodes", "episode_return", "eval_return", "pg_loss", "v_loss")
    rows_a = straight.read_metrics()
    # up to the interruption the curve is the uninterrupted run's, value for value (same seed, CPU)
    assert [[r[k] for k in deterministic] for r in before] == [[r[k] for k in deterministic] for r in
                                                                 rows_a[:len(before)]]
    steps = [int(r["step"]) for r in after]
    assert steps == sorted(set(steps)) and steps[-1] >= 6144 and steps[:len(before)] == [int(r["step"]) for r in
                                                                                         before]
    # after it, the schedule continues where it was (a function of the step); the environments restart afresh
    lr_a = {r["step"]: r["lr"] for r in rows_a}
    assert all(lr_a[r["step"]] == r["lr"] for r in after if r["step"] in lr_a)
    assert float(after[-1]["episodes"]) > float(before[-1]["episodes"])
    assert max(eval_returns(nnforge.engine.run.Run(cut))) > 2 * random_return("CartPole-v1")


def test_evaluate_is_deterministic_and_reports_episodes(cartpole, capsys):
    a = nnforge.evaluate(cartpole, episodes=4)
    episodes_a = json.loads((cartpole.path / "eval" / "episodes.json").read_text())
    assert main(["evaluate", str(cartpole.path), "--episodes", "4"]) == 0
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert a["return_mean"] == b["return_mean"] and a["episodes"] == 4
    assert json.loads((cartpole.path / "eval" / "episodes.json").read_text()) == episodes_a
    assert a["reward_threshold"] == 475 and a["success_rate"] == np.mean([e["return"] >= 475 for e in episodes_a])
    html = (cartpole.path / "report.html").read_text()
    assert "Episodes" in html and "Training curves" in html and "Confusion" not in html
    with pytest.raises(ConfigError, match="--features is for gan runs"):
        nnforge.evaluate(cartpole, features="x")


def test_play_writes_an_animated_gif(cartpole, tmp_path, capsys):
    out = tmp_path / "episode.gif"
    assert main(["play", str(cartpole.path), "--out", str(out), "--max-steps", "30"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["length"] <= 30
    with Image.open(out) as im:  # CartPole renders at 50 fps; a GIF shows at most 25: every other frame
        assert im.format == "GIF" and 1 < im.n_frames <= (result["length"] + 2) // 2


def test_onnx_policy_matches_pytorch_actions_with_normalisation_inside(cartpole):
    card = nnforge.export(cartpole)
    assert card["parity"]["split"] == "recorded" and card["parity"]["top1_agreement"] == 1.0
    loaded = nnforge.load(cartpole)
    session = ort.InferenceSession(str(cartpole.path / "model.onnx"), providers=["CPUExecutionProvider"])
    # raw observations (the ONNX graph normalises them itself), larger than training ever saw included
    obs = np.random.default_rng(1).normal(0, 2, (300, 4)).astype(np.float32)
    got, ref = session.run(None, {"input": obs})[0], loaded.forward(obs)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    actions = loaded.output.actions
    assert (actions(got) == actions(ref)).all()
    # the statistics matter: without them the policy would answer differently
    loaded.model.obs_norm.enabled = False
    assert not np.allclose(loaded.forward(obs), ref, atol=1e-3)


def test_continuous_actions_export_and_stay_within_bounds(tmp_path):
    run = nnforge.train("rl", env="Pendulum-v1", steps=1024, envs=2, n_steps=64, batch_size=64, eval_every=0,
                        eval_episodes=1, norm_obs=True, out=str(tmp_path), name="pendulum")
    assert run.meta["io"]["output"] == {"kind": "action", "head": "gaussian", "dim": 1, "low": [-2.0],
                                        "high": [2.0]}
    card = nnforge.export(run)
    assert card["parity"]["top1_agreement"] is None and card["parity"]["max_abs_diff"] < 1e-4
    rows = nnforge.load(run).predict([[1.0, 0.0, 8.0], [-1.0, 0.0, -8.0]])
    assert all(-2.0 <= r["action"][0] <= 2.0 and "value" in r for r in rows)
    with pytest.raises(ConfigError, match="DQN needs discrete actions"):
        nnforge.train("rl", env="Pendulum-v1", algo="dqn", steps=100, out=str(tmp_path), name="dqn")
    assert not (tmp_path / "rl" / "dqn").exists()  # a failed start leaves no run folder



def test_serve_answers_act_and_rejects_bad_observations(cartpole):
    with serving_in_thread(cartpole.path, backend="torch") as url:
        obs = [0.01, -0.2, 0.03, 0.4]
        r = httpx.post(url + "/v1/act", json={"observation": obs})
        assert r.status_code == 200, r.text
        answer = r.json()["actions"][0]
        raw = nnforge.load(cartpole).forward(np.array([obs], np.float32))[0]
        assert answer["action"] == int(raw[:2].argmax()) and answer["value"] == pytest.approx(float(raw[2]), abs=1e-5)
        assert sum(answer["probabilities"]) == pytest.approx(1.0)
        many = httpx.post(url + "/v1/act", json={"observations": [obs, [0.0] * 4]})
        assert many.status_code == 200 and len(many.json()["actions"]) == 2
        for body, says in (({"observation": [1, 2, 3]}, "shape [4]"), ({"observation": "left"}, "shape [4]"),
                           ({"observation": [[1, 2], [3, 4]]}, "got shape [2, 2]"),
                           ({"observation": [1, 2, "x", 4]}, "shape [4]"), ({"obs": [1, 2, 3, 4]}, "observation")):
            bad = httpx.post(url + "/v1/act", json=body)
            assert 400 <= bad.status_code < 500 and says in bad.json()["detail"], (body, bad.text)
        other = httpx.post(url + "/v1/predict", json={"inputs": [obs]})
        assert other.status_code == 404 and "answers POST /v1/act" in other.json()["detail"]


def test_carracing_from_pixels_end_to_end(tmp_path):
    run = nnforge.train("rl", env="CarRacing-v3", steps=32, envs=2, n_steps=16, batch_size=16, update_epochs=1,
                        env_kwargs={"max_episode_steps": 30}, eval_episodes=1, out=str(tmp_path), name="car")
    meta = run.meta
    assert meta["model"] == "cnn_policy" and meta["preset"] == "ppo_carracing"
    assert meta["io"]["input"] == {"kind": "observation", "shape": [2, 64, 64], "dtype": "uint8"}
    assert meta["io"]["output"]["head"] == "gaussian" and meta["io"]["output"]["dim"] == 3
    frames = np.load(run.path / "observations.npy")  # real stacked gray frames the policy saw
    assert frames.dtype == np.uint8 and frames.shape[1:] == (2, 64, 64) and frames.std() > 0
    rows = nnforge.load(run).predict(list(frames[:2]))
    assert len(rows[0]["action"]) == 3
    report = json.loads((run.path / "eval" / "report.json").read_text())
    assert report["episodes"] == 1 and report["reward_threshold"] == 900


# ---------------------------------------------------------------------------------------------------------------
# configuration and errors


def test_config_presets_counts_and_clear_errors(tmp_path):
    cfg = build_config(RLConfig, {"env": "LunarLander-v3", "steps": "200k"})
    assert cfg.preset == "ppo_box2d" and cfg.steps == 200_000 and cfg.envs == 16  # the preset, the user's steps
    cfg = build_config(RLConfig, {"env": "ALE/Pong-v5", "algo": "dqn", "lr": 1e-3})
    assert cfg.preset == "dqn_atari" and cfg.lr == 1e-3 and cfg.clip_reward
    assert build_config(RLConfig, {"env": "Foo-v0"}).preset == "ppo_default"
    with pytest.raises(ConfigError, match=r"'steps'.*200k"):
        build_config(RLConfig, {"env": "CartPole-v1", "steps": "many"})
    with pytest.raises(ConfigError, match="buffer_size: DQN options, but algo is ppo"):
        build_config(RLConfig, {"env": "CartPole-v1", "buffer_size": 10})
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        build_config(RLConfig, {"env": "CartPole-v1", "preset": "nope"})
    with pytest.raises(ConfigError, match=r"'NoSuchEnv-v0' is not registered with gymnasium"):
        nnforge.train("rl", env="NoSuchEnv-v0", out=str(tmp_path))
    with pytest.raises(ConfigError, match="ema"):
        nnforge.train("rl", env="CartPole-v1", ema=0.99, out=str(tmp_path))
    assert not (tmp_path / "rl").exists() or not any((tmp_path / "rl").iterdir())
    pre = build_input({"kind": "observation", "shape": [4, 84, 84], "dtype": "uint8"})
    with pytest.raises(InputError, match=r"0 to 255.*shape \[4, 84, 84\]"):
        pre.decode(np.full((4, 84, 84), 300).tolist())
    out = build_output({"kind": "action", "head": "gaussian", "dim": 2, "low": [-1, 0], "high": [1, 1]})
    np.testing.assert_allclose(out.actions(np.array([[3.0, -3.0, 0.5]])), [[1.0, 0.0]])

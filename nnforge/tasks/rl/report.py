"""The rl task's sections of report.html: learning curves over environment steps and over wall time, and the
evaluation's episodes (returns, lengths, success, a picture, the played episode).

    curves_section(run)                      # replaces the generic per-epoch curves (eval/section_curves.html)
    episodes_section(run, report, episodes)  # after nnforge evaluate
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np

from nnforge.engine.run import Run
from nnforge.evaluation._html import esc, img_tag
from nnforge.evaluation.report import add_section

PANELS = {  # title -> metrics.csv columns drawn in it (those the run logged)
    "ppo": [("Loss", ["pg_loss", "v_loss"]), ("Entropy", ["entropy"]),
            ("Update", ["approx_kl", "clip_frac", "explained_variance"])],
    "dqn": [("TD loss (Huber)", ["td_loss"]), ("Mean Q of the batch", ["q_mean"]), ("Exploration", ["epsilon"])],
}


def _columns(run: Run) -> dict[str, np.ndarray]:
    rows = run.read_metrics()
    cols: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            try:
                cols.setdefault(k, []).append(float(v) if v not in ("", None) else math.nan)
            except ValueError:
                cols.setdefault(k, []).append(math.nan)
    return {k: np.asarray(v) for k, v in cols.items()}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def curves_png(run: Run, algo: str) -> bytes | None:
    """Return over environment steps and over wall time, the algorithm's losses, and steps per second."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    c = _columns(run)
    if not c.get("step", np.empty(0)).size:
        return None
    step, wall = c["step"], c["time_s"]
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3).ravel()

    def returns(ax, x, xlabel):
        for col, label, style in (("episode_return", "training episodes", "-"), ("eval_return", "evaluation", "o-")):
            y = c.get(col)
            if y is not None and not np.isnan(y).all():
                keep = ~np.isnan(y)
                ax.plot(x[keep], y[keep], style, ms=3, lw=1.4, label=label)
        if "eval_return_std" in c:
            keep = ~np.isnan(c["eval_return"])
            ax.fill_between(x[keep], (c["eval_return"] - c["eval_return_std"])[keep],
                            (c["eval_return"] + c["eval_return_std"])[keep], alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_title("Return", fontsize=11)
        ax.legend(fontsize=8)

    returns(axes[0], step, "environment steps")
    returns(axes[1], wall, "wall time (s, evaluations excluded)")
    for col, label in (("sps", "training"), ("env_sps", "environments alone")):
        if col in c:
            axes[2].plot(step, c[col], lw=1.4, label=label)
    axes[2].set_yscale("log")
    axes[2].set_title("Environment steps per second", fontsize=11)
    axes[2].set_xlabel("environment steps")
    axes[2].legend(fontsize=8)
    for ax, (title, cols) in zip(axes[3:], PANELS[algo], strict=True):
        for col in cols:
            y = c.get(col)
            if y is not None and not np.isnan(y).all():
                keep = ~np.isnan(y)
                ax.plot(step[keep], y[keep], lw=1.4, label=col)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("environment steps")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax is not axes[1]:  # environment steps: 50k, 100k, ... instead of digits that run together
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    return _png(fig)


def curves_section(run: Run, algo: str) -> None:
    png = curves_png(run, algo)
    if png is None:
        return
    (run.eval_dir).mkdir(exist_ok=True)
    (run.eval_dir / "curves.png").write_bytes(png)
    html = (img_tag(png, "learning curves over environment steps and wall time") +
            '<p class="muted">Evaluation returns are the mean ± std of deterministic episodes on fixed seeds; '
            "training episodes are those that ended since the previous row (with exploration). TensorBoard has "
            "the same scalars by environment step (its Relative axis gives wall time).</p>")
    add_section(run.path, "curves", "Training curves", html)


def episodes_png(report: dict, episodes: list[dict]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.subplots()
    r = [e["return"] for e in episodes]
    colors = ["#1a7f37" if report.get("reward_threshold") is not None and x >= report["reward_threshold"]
              else "#0969da" for x in r]
    ax.bar(range(1, len(r) + 1), r, color=colors)
    ax.axhline(report["return_mean"], color="#59636e", ls="--", lw=1, label=f"mean {report['return_mean']:.1f}")
    if report.get("reward_threshold") is not None:
        ax.axhline(report["reward_threshold"], color="#1a7f37", ls=":", lw=1.2,
                   label=f"solved at {report['reward_threshold']:g}")
    ax.set_xlabel("episode")
    ax.set_ylabel("return")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def episodes_section(run: Run, report: dict, episodes: list[dict]) -> None:
    png = episodes_png(report, episodes)
    (run.eval_dir / "returns.png").write_bytes(png)
    cards = [("return (mean ± std)", f"{report['return_mean']:.1f} ± {report['return_std']:.1f}"),
             ("episode length", f"{report['length_mean']:.0f}"), ("episodes", str(report["episodes"]))]
    if report.get("success_rate") is not None:
        cards.append((f"success (return ≥ {report['reward_threshold']:g})", f"{100 * report['success_rate']:.0f}%"))
    html = ['<div class="cards">' + "".join(f'<div class="card"><div class="v">{esc(v)}</div>'
                                           f'<div class="k">{esc(k)}</div></div>' for k, v in cards) + "</div>",
            f'<p class="muted">{report["episodes"]} deterministic episodes of {esc(report["env"])} (reset seeds '
            f'{report["seed"]} to {report["seed"] + report["episodes"] - 1}), policy from checkpoints/'
            f'{esc(report["checkpoint"])}.safetensors (step {esc(report.get("step"))}).</p>',
            img_tag(png, "return of every evaluation episode")]
    gif = run.eval_dir / "episode.gif"
    if gif.is_file() and gif.stat().st_size < 8 * 2**20:  # the page stays mailable
        b64 = base64.b64encode(gif.read_bytes()).decode("ascii")
        html.append(f'<h3>An episode (nnforge play)</h3><img alt="one episode" src="data:image/gif;base64,{b64}">')
    rows = "".join(f"<tr><td>{i + 1}</td><td>{e['return']:.2f}</td><td>{e['length']}</td>"
                   f"<td>{'terminated' if e['terminated'] else 'truncated'}</td></tr>" for i, e in enumerate(episodes))
    html.append("<details><summary>Every episode</summary><table><thead><tr><th>episode</th><th>return</th>"
                f"<th>length</th><th>ended</th></tr></thead><tbody>{rows}</tbody></table></details>")
    add_section(run.path, "episodes", "Episodes", "".join(html))


def write_gif(frames: list[np.ndarray], path: Path, fps: float) -> Path:
    """An animated GIF of RGB frames, at most 320 px on the longer side and 25 frames per second (GIF viewers slow
    faster ones down)."""
    from PIL import Image

    stride = max(1, math.ceil(fps / 25))
    images = []
    for f in frames[::stride]:
        im = Image.fromarray(np.asarray(f, dtype=np.uint8))
        scale = 320 / max(im.size)
        if scale < 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
        images.append(im)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=round(1000 * stride / fps))
    tmp.replace(path)
    return path

"""Hyper-parameter search with Optuna: every trial a normal run folder, the study in an RDB any worker can join.

    nnforge tune image --data data/fashion-mnist --space space.yaml --trials 30 [--timeout 1h] [--metric val_acc]
    nnforge tune image --data DIR --space space.yaml --trials 30 --storage sqlite:///tune.db --study fm   # worker 2

space.yaml names config keys (model_args.NAME for a model option) and how to draw them:

    lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    batch_size: {type: categorical, choices: [64, 128, 256]}
    model_args.width: {type: int, low: 8, high: 32, step: 8}

Sampler: TPE (seeded); pruner: median (or hyperband) fed by the per-epoch validation metric, so a trial that is
clearly behind stops early. Storage: a SQLite file in the study's folder unless --storage names another (any Optuna
RDB URL: several `nnforge tune` processes on several machines then share one study, and the trial budget is the
study's, not each worker's). Each trial trains as `nnforge train` would, into runs/<task>/<study>-t<N>, resumable
and evaluable. An interrupted tuner loses no finished trial; the same command continues the study. The study folder
(runs/tune/<study>) gets best.yaml (a config `train --config` takes) and report.html (history, parameter
importances, slices: Optuna's own plots).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import yaml

from nnforge.config import ConfigError, load_config, read_yaml_mapping
from nnforge.engine.errors import TrainingDiverged, TrainingInterrupted
from nnforge.tasks import train_target

TYPES = ("float", "int", "categorical")


def parse_duration(text: str | None) -> float | None:
    """'90s', '30m', '1h', '1.5h', '600' -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", str(text))
    if not m:
        raise ConfigError(f"--timeout {text!r}: expected a duration such as 600, 90s, 30m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def read_space(path: str | Path, config_cls: type) -> dict[str, dict]:
    """The search space, checked: every key a config field (or model_args.NAME), every range well formed."""
    space = read_yaml_mapping(path)
    fields = config_cls.model_fields
    for key, spec in space.items():
        field = key.split(".", 1)[0]
        if field not in fields or (field == "model_args") != ("." in key):
            raise ConfigError(f"{path}: '{key}' is not a config key of {config_cls.__name__} (model options are "
                              "model_args.NAME); allowed: " + ", ".join(sorted(fields)))
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise ConfigError(f"{path}: '{key}' needs a type, one of {', '.join(TYPES)}")
        need = ("choices",) if spec["type"] == "categorical" else ("low", "high")
        missing = [k for k in need if k not in spec]
        if missing:
            raise ConfigError(f"{path}: '{key}' ({spec['type']}) needs {', '.join(missing)}")
    return space


def suggest(trial, space: dict[str, dict]) -> dict:
    """One trial's values as config overrides (model_args.NAME collected into model_args)."""
    values, model_args = {}, {}
    for key, spec in space.items():
        t = spec["type"]
        if t == "float":
            v = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")),
                                    step=spec.get("step"))
        elif t == "int":
            v = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                  step=int(spec.get("step", 1)))
        else:
            v = trial.suggest_categorical(key, list(spec["choices"]))
        if key.startswith("model_args."):
            model_args[key.split(".", 1)[1]] = v
        else:
            values[key] = v
    if model_args:
        values["model_args"] = model_args
    return values



def _open_study(name: str, storage: str, direction: str, sampler, pruner):
    """Create or load the study. Two workers started together both find the storage empty and both create its
    tables (Optuna's migration: UNIQUE alembic_version, or "table already exists"); the loser retries and loads."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            return optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True,
                                       sampler=sampler, pruner=pruner)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))

def tune(task: str, space: str | Path, trials: int = 20, config: str | Path | None = None,
         storage: str | None = None, study: str | None = None, timeout: str | float | None = None,
         metric: str | None = None, pruner: str = "median", seed: int = 0, **overrides) -> dict:
    """Run (or continue) a study; returns the best trial's number, value, params and the files written."""
    try:
        import optuna
    except ImportError:
        raise RuntimeError("nnforge tune needs Optuna: pip install 'nnforge[tune]' (or pip install optuna)") from None
    from nnforge.tasks.base import train_run

    _, cls = train_target(task)
    space_spec = read_space(space, cls)
    base = load_config(cls, config, overrides)  # the config every trial starts from; errors show before any trial
    metric = metric or base.monitor
    direction = "minimize" if metric.endswith("loss") else "maximize"
    name = study or f"{task}-{Path(getattr(base, 'data', None) or base.name or 'study').stem}"
    folder = Path(base.out) / "tune" / name
    folder.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    the_pruner = optuna.pruners.HyperbandPruner() if pruner == "hyperband" else optuna.pruners.MedianPruner(
        n_startup_trials=3, n_warmup_steps=1)
    s = _open_study(name, storage, direction, optuna.samplers.TPESampler(seed=seed), the_pruner)
    user = {k: v for k, v in overrides.items() if v is not None}

    def objective(trial) -> float:
        values = {**user, **suggest(trial, space_spec)}
        if "model_args" in user and "model_args" in values:
            values["model_args"] = {**user["model_args"], **values["model_args"]}
        best: list[float] = []

        def report(row: dict) -> None:
            if metric not in row:
                raise ConfigError(f"--metric {metric} is not logged; the runs log " + ", ".join(row))
            value = float(row[metric])
            best.append(value)
            trial.report(value, int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {row['epoch']}: {metric} {value:.4f}")

        print(f"tune: trial {trial.number}: {values}", file=sys.stderr, flush=True)
        try:
            trial_cfg = load_config(cls, config, {**values, "name": f"{name}-t{trial.number}"})
            run = train_run(task, trial_cfg, on_epoch=report)
        except TrainingDiverged as err:  # a recipe that diverges is a bad recipe, not a broken tuner
            raise optuna.TrialPruned(f"diverged: {err}") from None
        trial.set_user_attr("run", str(run.path))
        return max(best) if direction == "maximize" else min(best)

    # the budget is the study's: workers sharing the storage stop together once it holds `trials` finished trials
    stop = optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,
                                                         optuna.trial.TrialState.PRUNED))
    t0 = time.perf_counter()
    try:
        s.optimize(objective, n_trials=trials, timeout=parse_duration(timeout), callbacks=[stop],
                   catch=(), gc_after_trial=True)
    except TrainingInterrupted:
        print("tune: interrupted; finished trials are kept in the study; run the same command to continue",
              file=sys.stderr)
        raise
    return write_study(s, folder, cls, base, metric, time.perf_counter() - t0)


def write_study(s, folder: Path, cls: type, base, metric: str, seconds: float) -> dict:
    """best.yaml (a full config train --config takes) and report.html with Optuna's plots."""
    import optuna

    done = [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in s.trials if t.state == optuna.trial.TrialState.PRUNED]
    if not done:
        raise RuntimeError(f"study {s.study_name}: no trial finished ({len(pruned)} pruned)")
    best = s.best_trial
    overrides = {}
    for key, v in best.params.items():
        if key.startswith("model_args."):
            overrides.setdefault("model_args", dict(base.model_args))[key.split(".", 1)[1]] = v
        else:
            overrides[key] = v
    best_cfg = cls(**{**base.model_dump(exclude_unset=True), **overrides, "name": None})
    (folder / "best.yaml").write_text(yaml.safe_dump(best_cfg.model_dump(mode="json"), sort_keys=False))
    summary = {"study": s.study_name, "best_trial": best.number, "best_value": best.value, "metric": metric,
               "params": best.params, "run": best.user_attrs.get("run"), "finished": len(done),
               "pruned": len(pruned), "seconds": round(seconds, 1), "best_config": str(folder / "best.yaml")}
    (folder / "report.html").write_text(_report(s, summary), encoding="utf-8")
    summary["report"] = str(folder / "report.html")
    print(f"tune: best trial {best.number}: {metric} {best.value:.4f} with {best.params}; {len(done)} finished, "
          f"{len(pruned)} pruned; {folder / 'best.yaml'}", file=sys.stderr)
    return summary


def _report(s, summary: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    from nnforge.evaluation._html import esc, img_tag, page

    pictures = []
    for title, draw in (("Optimisation history", ov.plot_optimization_history),
                        ("Parameter importances", ov.plot_param_importances), ("Slices", ov.plot_slice)):
        try:
            draw(s)
            buf = io.BytesIO()
            plt.gcf().set_size_inches(9, 4.5)
            plt.tight_layout()
            plt.savefig(buf, format="png", dpi=100)
            pictures.append(f"<section><h2>{esc(title)}</h2>{img_tag(buf.getvalue(), title)}</section>")
        except (ValueError, RuntimeError, ZeroDivisionError) as err:  # too few trials for this plot yet
            pictures.append(f"<section><h2>{esc(title)}</h2><p class='muted'>not available yet: {esc(err)}</p>"
                            "</section>")
        finally:
            plt.close("all")
    rows = "".join(f"<tr><td>{t.number}</td><td>{esc(t.state.name)}</td><td>"
                   f"{'' if t.value is None else f'{t.value:.4f}'}</td><td>{esc(t.params)}</td></tr>"
                   for t in s.trials)
    body = (f"<section><h2>Best</h2><p>trial {summary['best_trial']}: {esc(summary['metric'])} "
            f"<b>{summary['best_value']:.4f}</b> with {esc(summary['params'])}; run {esc(summary['run'])}; "
            f"{summary['finished']} finished, {summary['pruned']} pruned.</p></section>" + "".join(pictures) +
            f"<section><h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>value</th><th>params</th></tr>"
            f"{rows}</table></section>")
    return page(f"nnforge tune: {s.study_name}", body)

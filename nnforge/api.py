"""The Python API; the command line is a thin layer over it.

    import nnforge
    run = nnforge.train("image", data="data/fashion-mnist", epochs=3)
    nnforge.evaluate(run)
    nnforge.load(run).predict(["shoe.png"], top_k=3)
"""

from __future__ import annotations

from pathlib import Path

from nnforge.config import ConfigError, load_config, read_yaml_mapping
from nnforge.engine.run import Run
from nnforge.tasks import get_task, train_target, train_targets


def _run_path(run) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def task_of(run) -> str:
    """The task that trained RUN (meta.json); runs from before tasks recorded their input type instead."""
    path = _run_path(run)
    meta = Run(path).read_json("meta.json")
    name = meta.get("task", "")
    targets = train_targets()
    return targets[name][0] if name in targets else name


def train(task: str, config: str | Path | None = None, resume: str | Path | None = None, *, on_epoch=None,
          **overrides) -> Run:
    """Train a model for `task` (image, text, ...: `nnforge train --help` lists them); keyword arguments are config
    fields and win over the file.

    resume: a run folder to continue from its last checkpoint (pass a larger `epochs` to extend a finished run).
    on_epoch: called with every epoch's metrics row (a tuner prunes through it by raising).
    """
    from nnforge.tasks.base import train_run

    _, cls = train_target(task)
    base = None
    if resume is not None:
        run = Path(resume)
        if not (run / "checkpoints" / "last.safetensors").is_file():
            raise FileNotFoundError(f"{run}: no checkpoints/last.safetensors to resume from")
        trained_as = Run(run).read_json("meta.json").get("train") or Run(run).read_json("meta.json").get("task")
        if trained_as != task:
            raise ConfigError(f"{run} was trained with `nnforge train {trained_as}`, not `{task}`")
        base = read_yaml_mapping(run / "config.yaml")
    cfg = load_config(cls, config, overrides, base=base)
    return train_run(task, cfg, resume=str(resume) if resume is not None else None, on_epoch=on_epoch)


def tune(task: str, space: str | Path, trials: int = 20, **options) -> dict:
    """Optuna search over `space` (YAML: config key -> distribution); options: config, storage, study, timeout,
    metric, pruner, seed, and config fields for the base config. Returns the best trial and the files written."""
    from nnforge.tune import tune as run_study

    return run_study(task, space, trials, **options)


def load(run, which: str = "best", device: str = "auto"):
    """A trained run ready to use, whatever its task (tensors and JSON only; nothing is unpickled)."""
    from nnforge.inference import load as load_run

    return load_run(_run_path(run), which=which, device=device)


def evaluate(run, data: str | None = None, device: str = "auto", features: str | Path | None = None,
             episodes: int | None = None) -> dict:
    """The run's task evaluates it into RUN/eval/ and RUN/report.html (classification: report, confusion matrix,
    worst mistakes; GANs: FID and KID in nnforge features; RL: returns of deterministic episodes, ...); returns
    the headline metrics.

    features: GAN runs only: the nnforge image classifier run whose features FID uses (default: the run's own).
    episodes: RL runs only: how many deterministic episodes to play (default 20).
    """
    task = get_task(task_of(run))
    options = {k: v for k, v in (("features", None if features is None else str(features)), ("episodes", episodes))
               if v is not None}
    for key, owner in (("features", "gan"), ("episodes", "rl")):  # options only one task reads
        if key in options and task.name != owner:
            raise ConfigError(f"--{key} is for {owner} runs; {_run_path(run)} is a {task.name} run")
    return task.evaluate(Run(_run_path(run)), data=data, device=device, **options)


def play(run, out: str | Path | None = None, seed: int | None = None, max_steps: int | None = None,
         device: str = "auto") -> dict:
    """Render one episode of an rl run's policy to an animated GIF (default RUN/eval/episode.gif); returns its
    path, return and length."""
    task = get_task(task_of(run))
    if task.name != "rl":
        raise ConfigError(f"play renders an rl run's episodes; {_run_path(run)} is a {task.name} run")
    return task.play(Run(_run_path(run)), out=None if out is None else str(out), seed=seed, max_steps=max_steps,
                     device=device)


def generate(run, n: int = 64, class_name: str | None = None, seed: int | None = None,
             out: str | Path | None = None, out_dir: str | Path | None = None, force: bool = False,
             device: str = "auto") -> dict:
    """n new images from a generator run (a run whose verb is generate, e.g. `nnforge train gan`).

    class_name: conditional generators: the class to make (default: the classes in turn). seed: the same seed makes
    the same images, here and on the server (default: a fresh one, returned). out: write them as one grid PNG;
    out_dir: one PNG per image (0000.png, ...); existing files are only replaced with force.
    Returns {"seed", "class", "images": (n, H, W, C) uint8, "files": [paths written]}.
    """
    from nnforge.data.latent_input import check_seed, fresh_seed
    from nnforge.evaluation.grids import grid, save_png

    loaded = load(run, device=device)
    if loaded.io.get("verb") != "generate":
        raise ConfigError(f"{_run_path(run)} answers {loaded.io.get('verb')}, not generate: it is not a generator")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--n {n!r}: expected a whole number >= 1")
    seed = fresh_seed() if seed is None else check_seed(seed)
    images = loaded.infer(loaded.input.sample(n, class_name, seed))  # (n, H, W, C) uint8
    files: list[Path] = []
    if out is not None:
        path = Path(out)
        if path.suffix.lower() != ".png":
            raise ValueError(f"--out {path}: expected a .png file name")
        if path.exists() and not force:
            raise FileExistsError(f"--out {path} exists; pass --force to replace it")
        files.append(save_png(grid(images, 8), path))
    if out_dir is not None:
        folder = Path(out_dir)
        names = [folder / f"{i:04d}.png" for i in range(n)]
        taken = [p for p in names if p.exists()]
        if taken and not force:
            raise FileExistsError(f"--out-dir {folder} already holds {taken[0].name}; pass --force to replace")
        files += [save_png(img, p) for img, p in zip(images, names, strict=True)]
    return {"seed": seed, "class": class_name, "images": images, "files": files}


def predict(run, inputs: list, **options) -> list[dict]:
    """One answer per input, e.g. top-k labels and probabilities for a classifier (options: top_k)."""
    return load(run).predict(inputs, **options)


def recommend(run, user: str | int | None = None, item: str | int | None = None, history: list | None = None,
              k: int = 10, exclude_seen: bool = False, device: str = "auto") -> dict:
    """Ranked items from a recommender run (`nnforge train recsys`): for a known user (an unknown one gets the popular
    items, with "fallback": "popular"), for a history of item ids (oldest first), or like one item ("more like
    this"). Returns {"input", "items" (ids), "titles", "scores", "fallback"}."""
    loaded = load(run, device=device)
    if loaded.io.get("verb") != "recommend":
        raise ConfigError(f"{_run_path(run)} answers {loaded.io.get('verb')}, not recommend: it is not a recommender")
    request = {key: value for key, value in (("user", user), ("item", item), ("history", history)) if value is not None}
    return loaded.predict([{**request, "k": k, "exclude_seen": exclude_seen}])[0]


def add_items(run, items, id_col: str | None = None, text_cols: str | None = None, title_col: str | None = None,
              device: str = "auto") -> dict:
    """Add items to a text-aware recommender run without retraining: their text is embedded through the run's item
    tower and they join its index. items: a CSV/TSV file (an id column and text columns) or a list of
    {"id", "title", "text"}. Returns {"added", "items" (catalogue size), "ids"}."""
    if task_of(run) != "recsys":
        raise ConfigError(f"add_items adds to recommender runs; {_run_path(run)} is a {task_of(run)} run")
    from nnforge.tasks.recsys_items import add_items as add

    return add(_run_path(run), items, id_col=id_col, text_cols=text_cols, title_col=title_col, device=device)


def doctor(task: str = "image", config: str | Path | None = None, out: str | Path | None = None,
           only: list[str] | None = None, **overrides) -> dict:
    """Check data, model and recipe of a classifier before a long run: PASS / WARN / FAIL per check, into
    OUT/doctor.json.

    Keyword arguments are config fields as for train(); `model` may also be an nn.Module to examine.
    out: the doctor's folder (default runs/doctor/<data folder name>). only: a subset of the checks
    (data, batch, init_loss, lr_range, baseline, overfit). Returns what doctor.json holds ("status": worst).
    """
    task_name, cls = train_target(task)
    if task_name != "classify":
        raise ConfigError(f"the doctor examines classifiers (image, text), not '{task}'")
    module = overrides.pop("model", None)
    if isinstance(module, str):
        overrides["model"], module = module, None
    from nnforge.tasks.doctor import run_doctor

    return run_doctor(load_config(cls, config, overrides), out=out, model=module, only=only)


def compare(run_a, run_b, output: str | Path | None = None, threshold: float = 0.01) -> dict:
    """Per-metric and per-class differences (b - a) of two evaluated runs, also written as JSON.

    output: where the JSON goes (default RUN_A/compare_<RUN_B folder name>.json); its path is under "output".
    """
    import json

    from nnforge.evaluation.compare import compare_runs

    a, b = _run_path(run_a), _run_path(run_b)
    result = compare_runs(a, b, threshold=threshold)
    path = Path(output) if output is not None else a / f"compare_{b.name}.json"
    result["output"] = str(path)
    path.write_text(json.dumps(result, indent=2))
    return result


def export(run, opset: int | None = None, quantize: str | None = None, **options) -> dict:
    """RUN/model.onnx checked against PyTorch, RUN/model.json beside it (and RUN/model.int8.onnx for "int8").

    options: tolerance, exporter ("auto" | "dynamo" | "torchscript"), which ("best" | "last").
    """
    from nnforge.deploy.export import export_onnx

    return export_onnx(_run_path(run), opset=opset, quantize=quantize, **options)


def serve(run, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, token: str | None = None,
          **options) -> None:
    """Serve RUN over HTTP until SIGTERM; options are nnforge.deploy.server.ServeSettings fields."""
    import os

    from nnforge.deploy.settings import ServeSettings

    settings = ServeSettings(str(_run_path(run)), host, port, workers, token or os.environ.get("NNFORGE_TOKEN"),
                             **options)
    settings.check()  # a refused flag fails before the server's heavy imports
    from nnforge.deploy.server import serve as run_server

    run_server(settings)

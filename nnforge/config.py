"""Typed configuration: one class per task (and per input of a task), a default and a docstring per field.

    cfg = ImageTrainConfig(data="data/fashion-mnist", epochs=3)
    cfg = load_config(ImageTrainConfig, "run.yaml", overrides={"lr": 1e-3})

An unknown key or a wrong type raises ConfigError naming the key and what is allowed.
The command line builds its options from these classes, so a field here is a flag there.

    EngineConfig          what the training engine needs (any task): length, optimizer, schedule, precision, run
    ClassifyConfig        + what every classifier needs: data, model, splits, loss options
    ImageTrainConfig      + image options (nnforge train image)
    TextTrainConfig       + text options (nnforge train text)
    GanConfig             nnforge train gan: images, DCGAN / conditional DCGAN, FID options
    RLConfig              nnforge train rl: environment, algorithm (PPO, DQN), presets
    RecsysConfig          nnforge train recsys: interactions and item text, popularity / BPR / two-tower / SASRec
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config key is unknown or has a value of the wrong type."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              protected_namespaces=())


class EngineConfig(_Config):
    """What the training engine needs; shared by every task that trains with it."""

    epochs: int = 10
    """Passes over the training data."""
    batch_size: int = 256
    """Examples per optimizer step."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw, or sgd with Nesterov momentum."""
    lr: float = 3e-3
    """Peak learning rate (reached after warmup)."""
    weight_decay: float = 5e-4
    """Decoupled weight decay; never applied to norms and biases."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW's moving-average factors for the gradient and its square (DCGAN wants 0.5,0.999)."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    eps: float = 1e-8
    """AdamW's epsilon, added to the root of the squared-gradient average."""
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    """LR schedule after warmup: onecycle (linear down to 0), cosine, or constant."""
    warmup_epochs: float = 0.5
    """Linear warmup length, in epochs (fractions allowed)."""
    clip_grad: float | None = 5.0
    """Clip the global gradient norm to this value; null disables."""
    ema: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999) and evaluate with it."""
    early_stop: int | None = None
    """Stop after this many epochs without improvement of the monitored metric; null disables."""
    monitor: str = "val_acc"
    """Logged metric that picks the best checkpoint and drives early stopping."""
    monitor_mode: Literal["auto", "max", "min"] = "auto"
    """Whether a larger or a smaller monitored value is better; auto asks the task."""
    seed: int = 0
    """Seeds every random number; on the CPU the same seed repeats a run exactly."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to train; auto picks cuda, then mps, then cpu."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto uses bf16 autocast where the device runs it fast (CUDA with bf16, CPUs with AMX or AVX512-BF16); RL
    policies on vector observations stay fp32 on the CPU (their small layers cost less than the casts)."""
    channels_last: bool = True
    """Use the channels-last memory format for 4-D image batches (faster convolutions)."""
    compile: bool = False
    """Compile the models with torch.compile (slow start, faster steps on long runs)."""
    log_every: int = 20
    """Steps between progress-bar updates and the NaN check."""
    track: str | None = None
    """Also log to mlflow (mlflow:URI for a tracking server) and/or wandb (offline unless wandb:online), e.g.
    "mlflow,wandb"; metrics.csv and TensorBoard are always written."""
    out: str = "runs"
    """Parent folder of run folders."""
    name: str | None = None
    """Run folder name; null picks exp1, exp2, ..."""


class ClassifyConfig(EngineConfig):
    """What every classifier needs, whatever its input."""

    data: str
    """Where the labelled examples are (the input type's layouts)."""
    model: str
    """Registered model name (nnforge list-models)."""
    model_args: dict[str, int | float | bool | str] = {}
    """Extra model options, e.g. width=32 for resnet_tiny (nnforge list-models shows each model's)."""
    label_col: str = "label"
    """CSV column (or JSON key) with class labels."""
    val_split: float = 0.1
    """Fraction of the training examples held out for validation when no validation split is given."""
    test_split: float = 0.1
    """Fraction held out for testing when no test split is given."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    class_weights: Literal["none", "auto"] = "none"
    """auto weighs the loss by inverse class frequency (for imbalanced data)."""
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    """balanced draws every class equally often (sampling with replacement)."""
    weights: str | None = None
    """Weights to start from: a local state dict or an nnforge run/checkpoint; the head is replaced."""
    freeze_epochs: int = 0
    """Train only the head for this many epochs, then unfreeze the body."""


class ImageTrainConfig(ClassifyConfig):
    """nnforge train image: a folder of class folders, train/val/test folders, or a CSV of paths and labels."""

    data: str
    """Class folders, train/ val/ test/ folders, or a CSV with path and label columns."""
    model: str = "resnet_tiny"
    """Registered model name (nnforge list-models)."""
    img_size: int | None = None
    """Square side the model sees; null uses the most common size in the data (224 for large images)."""
    path_col: str = "path"
    """CSV column with image paths (relative to the CSV)."""
    crop_pad: int | None = None
    """Random-crop padding in pixels for the tensor-cache path; null uses img_size // 8; 0 disables."""
    flip: bool = True
    """Random horizontal flips during training."""
    min_size: int = 8
    """Images smaller than this on either side are skipped as unusable."""
    pretrained: bool = False
    """Load the model's published ImageNet weights (torchvision's need a network the first time)."""
    cache: Literal["auto", "tensor", "stream"] = "auto"
    """auto keeps small images decoded in a uint8 tensor cache and streams large ones through workers."""
    cache_dir: str | None = None
    """Where decoded tensors are cached; null uses $NNFORGE_CACHE or ~/.cache/nnforge."""
    cache_max_gb: float = 4.0
    """Oldest cache entries are removed beyond this size."""
    workers: int | None = None
    """DataLoader / decode worker processes; null uses the number of CPU cores."""


class TextTrainConfig(ClassifyConfig):
    """nnforge train text: a CSV, TSV or JSON Lines file of texts and labels (or train/val/test files)."""

    data: str
    """CSV/TSV/JSONL file, or a folder holding train.* and optional val.* / test.* files."""
    text_col: str = "text"
    """Column (or JSON key) holding the text."""
    group_col: str | None = None
    """Column (or JSON key) naming each text's group (a speaker, a document, a customer): val and test are carved
    out whole groups at a time, so the validation score that picks the model measures texts from unseen groups."""
    model: str = "auto"
    """Registered text model name (nnforge list-models --input text); auto trains the candidates that suit the data
    (fasttext, and minilm where its files are installed) and keeps the best on the validation split."""
    tokenizer: Literal["bpe", "wordpiece", "ngrams"] = "bpe"
    """Tokenizer trained on the training split (ignored by pretrained encoders, which bring their own); ngrams:
    hashed word and character n-grams (the fasttext model's)."""
    vocab_size: int = 8000
    """Tokenizer vocabulary size (for ngrams: hash buckets + 1)."""
    max_len: int = 128
    """Longest token sequence kept (longer texts are truncated)."""
    lowercase: bool = True
    """Lower-case texts before the trained tokenizer sees them (pretrained encoders keep their own rule)."""
    encoder: str | None = None
    """Pretrained encoder models (minilm): a Hugging Face name or local folder; null uses the packaged one."""
    pretrained: bool = True
    """Pretrained encoder models start from their published weights; false starts them from random weights."""
    freeze_encoder: bool = False
    """For pretrained encoders (minilm): train only the head."""


class GanConfig(EngineConfig):
    """nnforge train gan: a generator of new images like those in a folder (DCGAN, conditional DCGAN)."""

    data: str
    """Images: class folders (cdcgan needs them), train/ val/ test/ folders, a CSV of paths, or a flat folder."""
    model: Literal["dcgan", "cdcgan"] = "dcgan"
    """dcgan, or cdcgan (conditional on the class: a class embedding in G, a projection discriminator)."""
    model_args: dict[str, int | float | bool | str] = {}
    """Extra model options, e.g. width=32 for narrower networks (nnforge list-models --task gan)."""
    image_size: int = 32
    """Square side of the generated images: 16, 32, 64 or 128 (the data is resized to it; 28 px data -> 32)."""
    z_dim: int = 128
    """Length of the generator's noise vector z."""
    loss: Literal["nonsaturating", "hinge"] = "nonsaturating"
    """GAN loss: the non-saturating logistic loss of the DCGAN paper, or the hinge loss."""
    spectral_norm: bool = False
    """Spectral normalisation on every discriminator layer (which then drops its BatchNorm)."""
    epochs: int = 10
    """Passes over the training images."""
    batch_size: int = 128
    """Real images per step (and as many generated ones)."""
    lr: float = 2e-4
    """Learning rate of both networks (the DCGAN paper's)."""
    betas: tuple[float, float] = (0.5, 0.999)
    """Adam's moving-average factors (the DCGAN paper's 0.5, 0.999)."""
    weight_decay: float = 0.0
    """Decoupled weight decay; GANs train without it."""
    schedule: Literal["onecycle", "cosine", "constant"] = "constant"
    """LR schedule after warmup; GANs keep it constant."""
    warmup_epochs: float = 0.0
    """Linear warmup length, in epochs."""
    clip_grad: float | None = None
    """Clip the global gradient norm of each network to this value; null disables."""
    ema: float | None = 0.999
    """EMA decay of the generator's weights; the EMA copy makes the samples, evaluation, export and serving."""
    monitor: str = "val_fid"
    """Logged metric that picks the best checkpoint (val_fid: lower is better)."""
    label_col: str = "label"
    """CSV column with class labels (optional for dcgan)."""
    path_col: str = "path"
    """CSV column with image paths (relative to the CSV)."""
    val_split: float = 0.0
    """Fraction of the training images held out for validation when no val split is given (val_fid uses train)."""
    test_split: float = 0.1
    """Fraction held out as real test images (the FID floor, memorisation) when no test split is given."""
    flip: bool = False
    """Random horizontal flips of the real images."""
    min_size: int = 8
    """Images smaller than this on either side are skipped as unusable."""
    features: str | None = None
    """An nnforge image classifier run whose features FID uses; null trains one on this data (RUN/image/features)."""
    features_epochs: int = 3
    """Epochs of the feature classifier trained when no --features run is given."""
    fid_samples: int = 1000
    """Generated and real images for the per-epoch val_fid (a cheap, monitorable estimate)."""
    eval_samples: int = 5000
    """Generated images for evaluate's FID, KID and precision/recall (real ones: at most as many as there are)."""
    cache_dir: str | None = None
    """Where decoded tensors are cached; null uses $NNFORGE_CACHE or ~/.cache/nnforge."""
    cache_max_gb: float = 4.0
    """Oldest cache entries are removed beyond this size."""
    workers: int | None = None
    """Processes that check and decode the images once; null uses the number of CPU cores."""

    @field_validator("image_size")
    @classmethod
    def _gan_size(cls, v: int) -> int:
        if v not in (16, 32, 64, 128):  # a DCGAN doubles a 4x4 map up to the image
            raise ValueError("expected 16, 32, 64 or 128 (the data is resized to it)")
        return v


class RecsysConfig(EngineConfig):
    """nnforge train recsys: a recommender from user-item interactions (CSV/TSV, RecBole atomic files, MovieLens).

    The model's own defaults (its recipe: nnforge list-models --task recsys) fill the engine options you do not set.
    """

    data: str
    """Interactions: a CSV/TSV file (user, item, optional rating and timestamp), a folder of RecBole atomic files
    (NAME.inter, NAME.item) or MovieLens' u.data (u.item beside it is read too)."""
    items: str | None = None
    """Item side information: a CSV/TSV file with an item id column and text columns (title, genres, ...)."""
    item_text_cols: str | None = None
    """Comma-separated item columns the item tower reads, e.g. title,genres; null reads every column but the id."""
    item_title_col: str | None = None
    """Item column shown as the title in answers; null picks one named like title or name."""
    user_col: str | None = None
    """Interactions column with user ids; null finds user, user_id, userId, ..."""
    item_col: str | None = None
    """Interactions column with item ids (also the item file's id column); null finds item, item_id, movieId, ..."""
    rating_col: str | None = None
    """Interactions column with ratings; null finds rating or score (optional)."""
    time_col: str | None = None
    """Interactions column with timestamps (seconds or ISO dates); null finds timestamp or time (optional)."""
    min_rating: float | None = None
    """Keep only interactions rated at least this (ratings as implicit feedback); null keeps them all."""
    model: str = "two_tower"
    """Registered recommender (nnforge list-models --task recsys): popularity, bpr, two_tower, sasrec."""
    model_args: dict[str, int | float | bool | str] = {}
    """Model options, e.g. dim=128,user_tower=attention (nnforge list-models --task recsys shows each model's)."""
    split: Literal["random", "leave_last_out"] = "random"
    """random: RecBole's per-user split by split_ratios; leave_last_out: each user's last interaction is the test and
    the one before it the validation, in time order (sasrec's recipe picks it)."""
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train, validation and test shares of each user's interactions (split random)."""
    cold_items: float = 0.05
    """Share of the items held out of training with all their interactions: the cold-start slice, where only item
    text can help (0 disables; needs item text)."""
    max_history: int = 100
    """History items a user tower reads: the most recent ones."""
    negatives: Literal["sampled", "inbatch"] = "sampled"
    """two_tower / sasrec loss: softmax over the positive and num_negatives items drawn uniformly (sampled), or over
    the batch's other positives, corrected for their popularity (inbatch)."""
    num_negatives: int = 1000
    """Items drawn per step for the sampled softmax (every item when the catalogue is smaller)."""
    encoder: str | None = None
    """Sentence encoder of the item tower: a Hugging Face name or local folder; null uses the packaged MiniLM."""
    fine_tune_text: bool = False
    """Fine-tune the sentence encoder with the item tower (in-batch negatives; slow on a CPU) instead of keeping it
    frozen under a trained projection."""
    text_max_tokens: int = 64
    """Tokens of item text the encoder reads."""

    # the engine's options with a recommender's defaults (a model's recipe can change them)
    epochs: int = 100
    """Passes over the training interactions (users, for sasrec)."""
    batch_size: int = 512
    """Interactions per step (users, for sasrec)."""
    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the embedding and projection matrices."""
    schedule: Literal["onecycle", "cosine", "constant"] = "constant"
    """LR schedule after warmup."""
    warmup_epochs: float = 0.0
    """Linear warmup length, in epochs."""
    early_stop: int | None = 10
    """Stop after this many epochs without a better monitored metric; null disables."""
    monitor: str = "val_ndcg@10"
    """Validation metric that picks the best checkpoint: val_ndcg@10, val_recall@10, val_mrr@10, val_hit@10."""


# ---------------------------------------------------------------------------------------------------------------
# reinforcement learning: presets are YAML files shipped beside the rl task (data, read by path: no import upward)

RL_PRESETS = Path(__file__).parent / "tasks" / "rl" / "presets"
PPO_ONLY = ("n_steps", "update_epochs", "gae_lambda", "clip_coef", "clip_anneal", "clip_vloss", "vf_coef",
            "ent_coef", "norm_adv", "target_kl", "log_std_init", "norm_obs", "norm_reward")
DQN_ONLY = ("buffer_size", "learning_starts", "train_freq", "gradient_steps", "target_update", "tau",
            "exploration_fraction", "exploration_initial_eps", "exploration_final_eps", "n_step", "double_q")


def parse_count(value: Any) -> Any:
    """'200k' -> 200000, '1M' -> 1000000, '1.5e6' -> 1500000; numbers pass through."""
    if not isinstance(value, str):
        return value
    text = value.strip().replace("_", "").lower()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:], 1)
    try:
        number = float(text[:-1] if scale > 1 else text)
    except ValueError:
        raise ValueError(f"expected a count such as 200000, 200k or 1M, got {value!r}") from None
    if number * scale != int(number * scale):
        raise ValueError(f"expected a whole count, got {value!r}")
    return int(number * scale)


def rl_presets() -> dict[str, dict]:
    """name -> the preset file's mapping (algo, match: env-id patterns, values)."""
    return {p.stem: read_yaml_mapping(p) for p in sorted(RL_PRESETS.glob("*.yaml"))}


def rl_preset_for(algo: str, env: str, name: str | None = None) -> tuple[str, dict]:
    """(name, values) of the preset `name`, or of the first preset of `algo` whose match patterns fit `env`,
    else the algorithm's `<algo>_default`."""
    import fnmatch

    presets = rl_presets()
    if name is not None:
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(presets)}")
        if presets[name].get("algo") != algo:
            raise ValueError(f"preset {name!r} is for {presets[name].get('algo')}, not {algo}")
        return name, dict(presets[name].get("values") or {})
    for key, p in presets.items():
        if p.get("algo") == algo and any(fnmatch.fnmatchcase(env, pat) for pat in p.get("match") or []):
            return key, dict(p.get("values") or {})
    return f"{algo}_default", dict(presets.get(f"{algo}_default", {}).get("values") or {})


class RLConfig(EngineConfig):
    """nnforge train rl: an agent that learns by acting in a gymnasium environment (PPO or DQN).

    Values you do not set come from the preset for the algorithm and the environment (nnforge/tasks/rl/presets;
    `--preset NAME` picks one), then from the defaults below; config.yaml records the resolved values. Of the
    engine's options, rl uses lr, schedule (onecycle: linear annealing to 0; constant), clip_grad, eps, betas,
    weight_decay, batch_size, seed, device, precision, channels_last, log_every, monitor, out and name; epochs,
    warmup_epochs, optimizer and momentum are not used (steps sets the length; the optimizer is Adam), and ema,
    compile and early_stop are refused.
    """

    env: str
    """Gymnasium environment id: CartPole-v1, LunarLander-v3, CarRacing-v3, ALE/Pong-v5, ..."""
    algo: Literal["ppo", "dqn"] = "ppo"
    """ppo (discrete or continuous actions) or dqn (discrete actions)."""
    preset: str | None = None
    """Preset of hyper-parameters; null picks the one for algo and env (values you set win)."""
    steps: Annotated[int, BeforeValidator(parse_count)] = 100_000
    """Environment steps to train for, over all environments (200k and 1M are accepted)."""
    envs: int = 8
    """Environments stepped side by side (a vector environment)."""
    async_envs: bool = False
    """Step the environments in worker processes (for slow environments) instead of in this one."""
    env_kwargs: dict[str, int | float | bool | str] = {}
    """Keyword arguments for gymnasium.make, e.g. continuous=false for CarRacing-v3."""
    policy: str | None = None
    """Registered policy (nnforge list-models --task rl); null: an MLP for vectors, the Nature CNN for pixels."""
    policy_args: dict[str, int | float | bool | str | list[int]] = {}
    """Policy options, e.g. hidden=[64,64] (nnforge list-models --task rl shows each policy's)."""
    frame_stack: int = 4
    """Pixel observations: frames stacked into one observation."""
    frame_size: int = 84
    """Pixel observations: frames are resized to this square side."""
    frame_skip: int = 1
    """Pixel observations: each action is repeated this many times (Atari: always 4, by its preprocessing)."""
    grayscale: bool = True
    """Pixel observations: convert frames to grayscale."""
    gamma: float = 0.99
    """Discount factor."""
    norm_obs: bool = False
    """PPO: normalise observations by running mean and std (saved in the policy, so export and serve apply it)."""
    norm_reward: bool = False
    """PPO: scale rewards by the running std of the discounted return (training only)."""
    clip_reward: bool = False
    """Train on the sign of each reward (Atari); episode returns are still reported unclipped."""
    eval_every: Annotated[int, BeforeValidator(parse_count)] = 10_000
    """Environment steps between evaluations (deterministic episodes, logged as eval_return); 0: only at the end."""
    eval_episodes: int = 10
    """Episodes per evaluation during training."""
    target_return: float | None = None
    """Stop once an evaluation's mean return reaches this (e.g. 475 for CartPole-v1)."""
    max_time_s: float | None = None
    """Stop after this much training time in seconds (evaluations excluded), e.g. a fixed CPU budget."""
    checkpoint_every: Annotated[int, BeforeValidator(parse_count)] = 50_000
    """Environment steps between checkpoints/last.safetensors (also after every evaluation and at a stop)."""

    # the engine's options with the defaults of reinforcement learning
    lr: float = 2.5e-4
    """Adam's learning rate (annealed linearly to 0 by schedule onecycle)."""
    batch_size: int = 64
    """PPO: minibatch size; DQN: transitions per gradient step."""
    clip_grad: float | None = 0.5
    """Clip the global gradient norm to this value; null disables."""
    weight_decay: float = 0.0
    """Decoupled weight decay (Adam: 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moving-average factors."""
    eps: float = 1e-5
    """Adam's epsilon."""
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    """Learning rate over the run: onecycle anneals linearly to 0, constant keeps it."""
    log_every: Annotated[int, BeforeValidator(parse_count)] = 2048
    """Environment steps between rows of metrics.csv / TensorBoard (and the NaN check)."""
    monitor: str = "eval_return"
    """Logged metric that picks the best checkpoint."""

    # PPO
    n_steps: int = 128
    """PPO: steps per environment in each rollout."""
    update_epochs: int = 4
    """PPO: passes over each rollout."""
    gae_lambda: float = 0.95
    """PPO: GAE's lambda."""
    clip_coef: float = 0.2
    """PPO: clipping range of the policy ratio."""
    clip_anneal: bool = False
    """PPO: anneal the clipping range linearly to 0 with the learning rate."""
    clip_vloss: bool = False
    """PPO: clip the value loss around the rollout's values with clip_coef."""
    vf_coef: float = 0.5
    """PPO: weight of the value loss."""
    ent_coef: float = 0.0
    """PPO: weight of the entropy bonus."""
    norm_adv: bool = True
    """PPO: normalise advantages per minibatch."""
    target_kl: float | None = None
    """PPO: stop an update's epochs early once the approximate KL passes this."""
    log_std_init: float = 0.0
    """PPO, continuous actions: initial log standard deviation of the Gaussian policy."""

    # DQN
    buffer_size: Annotated[int, BeforeValidator(parse_count)] = 100_000
    """DQN: transitions kept in the replay buffer (pixels: uint8 frames, each stored once)."""
    learning_starts: Annotated[int, BeforeValidator(parse_count)] = 1000
    """DQN: environment steps of experience before learning starts."""
    train_freq: int = 4
    """DQN: environment steps between updates."""
    gradient_steps: int = 1
    """DQN: gradient steps per update."""
    target_update: int = 1000
    """DQN: environment steps between target network updates."""
    tau: float = 1.0
    """DQN: 1 copies the online network into the target (hard); below 1, Polyak averaging with this weight."""
    exploration_fraction: float = 0.1
    """DQN: fraction of the steps over which epsilon falls from its initial to its final value."""
    exploration_initial_eps: float = 1.0
    """DQN: epsilon at the start."""
    exploration_final_eps: float = 0.05
    """DQN: epsilon after the decay."""
    n_step: int = 1
    """DQN: n-step returns (1: one-step TD targets)."""
    double_q: bool = True
    """DQN: double DQN targets (the online network picks, the target network values)."""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill the keys the user did not give from the preset; say which options the other algorithm owns."""
        if not isinstance(data, dict) or "env" not in data or set(cls.model_fields) <= set(data):
            return data  # a complete config (config.yaml of a run, an assignment): nothing to fill
        algo = data.get("algo", "ppo")
        other = DQN_ONLY if algo == "ppo" else PPO_ONLY
        # config.yaml holds every field: the other algorithm's count only where they differ from the defaults
        wrong = [k for k in other if k in data and data[k] != cls.model_fields[k].default]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: {'DQN' if algo == 'ppo' else 'PPO'} options, but algo is {algo}")
        name, values = rl_preset_for(algo, str(data["env"]), data.get("preset"))
        return {**values, **data, "preset": name}


class LoopConfig(_Config):
    """nnforge loop NAME --config loop.yaml: when to retrain, how to judge, whom to tell."""

    labels: list[str]
    """Capture folders whose labelled items feed retraining (`nnforge serve NAME@champion --capture DIR`)."""
    min_new_labels: int = 100
    """Retrain once this many labelled items are new to the champion's lineage."""
    every: float | None = None
    """Also retrain when this many seconds have passed since the last round and at least one label is new."""
    poll_s: float = 60.0
    """Seconds between checks for new labels."""
    max_rounds: int | None = None
    """Stop after this many rounds (null: run until interrupted)."""
    tolerance: float = 0.01
    """Largest holdout (and fresh-slice) accuracy drop a challenger may have and still be promoted."""
    class_tolerance: float = 0.1
    """Largest drop of any class's holdout recall a challenger may have and still be promoted."""
    new_weight: float = 0.3
    """Share of the training examples the new labels make up after oversampling (at most 20 copies each)."""
    retrain: dict[str, Any] = {}
    """Config fields that win over the champion's when retraining, e.g. {epochs: 3}."""
    reload: list[str] = []
    """Server URLs to POST /v1/reload after a promotion (servers of NAME@champion follow the registry anyway)."""
    token: str | None = None
    """Bearer token for those servers (default: $NNFORGE_TOKEN)."""


def _explain(cls: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(cls.model_fields))
            lines.append(f"unknown key '{key}' for {cls.__name__}; allowed keys: {allowed}")
        elif not e["loc"]:  # a rule across fields (RLConfig's presets): its message names them
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def build_config(cls: type[_Config], values: dict[str, Any]) -> Any:
    try:
        return cls(**values)
    except ValidationError as err:
        raise ConfigError(_explain(cls, err)) from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[_Config], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: dict[str, Any] | None = None):
    """base (e.g. a resumed run's config.yaml), then values from a YAML file, then overrides (the command line)."""
    values: dict[str, Any] = dict(base or {})
    if path is not None:
        values.update(read_yaml_mapping(path))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(cls, values)


def save_config(cfg: BaseModel, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

"""Typed configuration: one class per task (and per input of a task), a default and a docstring per field.

    cfg = ImageTrainConfig(data="data/fashion-mnist", epochs=3)
    cfg = load_config(ImageTrainConfig, "run.yaml", overrides={"lr": 1e-3})

An unknown key or a wrong type raises ConfigError naming the key and what is allowed.
The command line builds its options from these classes, so a field here is a flag there.

    EngineConfig          what the training engine needs (any task): length, optimizer, schedule, precision, run
    ClassifyConfig        + what every classifier needs: data, model, splits, loss options
    ImageTrainConfig      + image options (nnforge train image)
    TextTrainConfig       + text options (nnforge train text)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


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
    """auto uses bf16 autocast where the device runs it fast (CUDA with bf16, CPUs with AMX or AVX512-BF16)."""
    channels_last: bool = True
    """Use the channels-last memory format for 4-D image batches (faster convolutions)."""
    compile: bool = False
    """Compile the models with torch.compile (slow start, faster steps on long runs)."""
    log_every: int = 20
    """Steps between progress-bar updates and the NaN check."""
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
    model: str = "bigru"
    """Registered text model name (nnforge list-models --input text)."""
    tokenizer: Literal["bpe", "wordpiece"] = "bpe"
    """Tokenizer trained on the training split (ignored by pretrained encoders, which bring their own)."""
    vocab_size: int = 8000
    """Tokenizer vocabulary size."""
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


def _explain(cls: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(cls.model_fields))
            lines.append(f"unknown key '{key}' for {cls.__name__}; allowed keys: {allowed}")
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

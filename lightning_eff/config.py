"""Structured-config schemas that validate every value before training starts.

Each config group member names its class with `_target_`; the schema registered for that class checks the
member's keys, types and ranges. A bad value raises one `ConfigError` whose message names the full key, the
value and what is allowed, e.g. ``model.n_head=3: must divide model.d_model=128``.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lightning_eff.capabilities import CAPABILITIES, CAPABILITY_GROUPS, check_strategy
from lightning_eff.loggers import LOGGERS, check_logger_installed
from lightning_eff.validation import ConfigError, check, check_choice, check_fraction, check_int

ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")


# --- run-level settings --------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Top-level keys of `conf/train.yaml`."""

    seed: int = 42
    run_dir: str = "outputs"
    resume: str | None = None
    logger: str = "csv"
    test_after_fit: bool = True

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0)
        check_choice("logger", self.logger, LOGGERS)
        check_logger_installed(self.logger)
        if self.resume not in (None, "auto"):
            check(
                Path(self.resume).is_file(),
                "resume",
                self.resume,
                "must be auto, null or an existing .ckpt file",
            )


@dataclass
class TrainerConfig:
    """The `trainer` group: keyword arguments of `lightning.Trainer` that the app lets a user set."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: int | None = 20
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    val_check_interval: float | None = None
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    limit_test_batches: float | None = None
    num_sanity_val_steps: int = 2
    deterministic: bool = False
    enable_progress_bar: bool | None = None
    enable_checkpointing: bool = True
    fast_dev_run: bool = False

    def __post_init__(self) -> None:
        check_choice("accelerator", self.accelerator, ACCELERATORS)
        check(
            self.devices == "auto" or (isinstance(self.devices, int) and (self.devices >= 1 or self.devices == -1)),
            "devices",
            self.devices,
            "must be a positive integer, -1 or auto",
        )
        check_int("num_nodes", self.num_nodes, 1)
        check_choice("precision", str(self.precision), PRECISIONS)
        check(
            self.max_epochs is None or self.max_epochs >= 1 or self.max_epochs == -1,
            "max_epochs",
            self.max_epochs,
            "must be >= 1, -1 (no limit) or null",
        )
        check(
            self.max_steps == -1 or self.max_steps >= 1,
            "max_steps",
            self.max_steps,
            "must be >= 1 or -1 (no limit)",
        )
        check_int("accumulate_grad_batches", self.accumulate_grad_batches, 1)
        check(
            self.gradient_clip_val is None or self.gradient_clip_val > 0,
            "gradient_clip_val",
            self.gradient_clip_val,
            "must be > 0 or null",
        )
        check_int("log_every_n_steps", self.log_every_n_steps, 1)
        check_int("check_val_every_n_epoch", self.check_val_every_n_epoch, 1)
        for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "val_check_interval"):
            value = getattr(self, name)
            check(
                value is None or value > 0,
                name,
                value,
                "must be > 0 (a fraction <= 1.0 or a batch count) or null",
            )
        check_int("num_sanity_val_steps", self.num_sanity_val_steps, -1)

    def world_size(self) -> int | None:
        """Processes this trainer will run, or None where Lightning decides (devices=auto or -1)."""
        if isinstance(self.devices, int) and self.devices >= 1:
            return self.devices * self.num_nodes
        return None

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `lightning.Trainer`; Lightning keeps its defaults where the config says null."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if kwargs["enable_progress_bar"] is None:
            kwargs["enable_progress_bar"] = sys.stderr.isatty()
        return {key: value for key, value in kwargs.items() if value is not None}


# --- reference tasks -----------------------------------------------------------------------------------


def _check_rates(lr: float, weight_decay: float) -> None:
    check(lr > 0, "lr", lr, "must be > 0")
    check(weight_decay >= 0, "weight_decay", weight_decay, "must be >= 0")


@dataclass
class DigitsMLPConfig:
    _target_: str = "lightning_eff.tasks.DigitsMLP"
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        check(
            len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes),
            "hidden_sizes",
            self.hidden_sizes,
            "must be a non-empty list of positive widths",
        )
        check_fraction("dropout", self.dropout, low_open=False)
        _check_rates(self.lr, self.weight_decay)


@dataclass
class DigitsCNNConfig:
    _target_: str = "lightning_eff.tasks.DigitsCNN"
    channels: list[int] = field(default_factory=lambda: [16, 32])
    lr: float = 2e-3
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        check(
            len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
            "channels",
            self.channels,
            "must be a non-empty list of positive channel counts",
        )
        _check_rates(self.lr, self.weight_decay)


@dataclass
class TinyGPTConfig:
    _target_: str = "lightning_eff.tasks.TinyGPT"
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    seq_len: int = 128
    vocab_size: int = 256
    dropout: float = 0.0
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20

    def __post_init__(self) -> None:
        check_int("n_layer", self.n_layer, 1)
        check_int("n_head", self.n_head, 1)
        check_int("d_model", self.d_model, 1)
        check(self.d_model % self.n_head == 0, "n_head", self.n_head, f"must divide d_model={self.d_model}")
        check_int("seq_len", self.seq_len, 1)
        check_int("vocab_size", self.vocab_size, 2)
        check_fraction("dropout", self.dropout, low_open=False)
        _check_rates(self.lr, self.weight_decay)
        check_int("warmup_steps", self.warmup_steps, 0)


def _check_split(val_fraction: float, test_fraction: float) -> None:
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    check(
        val_fraction + test_fraction < 0.9,
        "test_fraction",
        test_fraction,
        f"val_fraction + test_fraction must leave at least 10% to train (val_fraction={val_fraction})",
    )


@dataclass
class DigitsDataConfig:
    _target_: str = "lightning_eff.tasks.DigitsDataModule"
    batch_size: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, 1)
        _check_split(self.val_fraction, self.test_fraction)
        check_int("num_workers", self.num_workers, 0)


@dataclass
class TextDataConfig:
    _target_: str = "lightning_eff.tasks.TextDataModule"
    seq_len: int = 128
    batch_size: int = 32
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    max_bytes: int | None = None
    min_seq_len: int | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_int("seq_len", self.seq_len, 1)
        if self.min_seq_len is not None:
            check_int("min_seq_len", self.min_seq_len, 1)
            check(
                self.min_seq_len <= self.seq_len, "min_seq_len", self.min_seq_len, f"must be <= seq_len={self.seq_len}"
            )
        check_int("batch_size", self.batch_size, 1)
        _check_split(self.val_fraction, self.test_fraction)
        if self.max_bytes is not None:
            check_int("max_bytes", self.max_bytes, 40 * (self.seq_len + 1))
        check_int("num_workers", self.num_workers, 0)


# Schemas by the `_target_` they validate. A target without a schema (a user's own class) is only checked
# for being importable, since its arguments are the user's to define.
SCHEMAS: dict[str, type] = {
    schema._target_: schema
    for schema in (DigitsMLPConfig, DigitsCNNConfig, TinyGPTConfig, DigitsDataConfig, TextDataConfig)
}

# Which data each reference model can learn from.
MODEL_DATA = {
    DigitsMLPConfig._target_: DigitsDataConfig._target_,
    DigitsCNNConfig._target_: DigitsDataConfig._target_,
    TinyGPTConfig._target_: TextDataConfig._target_,
}


# --- the whole config ----------------------------------------------------------------------------------


@dataclass
class ValidatedConfig:
    """The config after validation: run settings, trainer, and each group's validated node."""

    run: RunConfig
    trainer: TrainerConfig
    groups: dict[str, Any]


def _typed(schema: type, node: Any, prefix: str) -> Any:
    """Merge `node` into `schema` and build it, turning OmegaConf's type errors into `ConfigError`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except ConfigError as error:
        raise error.under(prefix) from None
    except MissingMandatoryValue as error:
        raise ConfigError(str(error.full_key), "???", "is required").under(prefix) from None
    except OmegaConfBaseException as error:
        key = str(error.full_key or error.key or "?")
        value = OmegaConf.select(OmegaConf.create(node), key) if isinstance(node, (dict, DictConfig)) else None
        types = {f.name: f.type for f in dataclasses.fields(schema)}
        if key not in types:
            names = ", ".join(name for name in types if not name.startswith("_"))
            rule = f"unknown key; {prefix or 'the top level'} takes {names or 'no keys'}"
            raise ConfigError(key, value, rule).under(prefix) from None
        wanted = types[key]
        raise ConfigError(key, value, f"must be of type {getattr(wanted, '__name__', wanted)}").under(prefix) from None


def _omegaconf_type(annotation: Any) -> Any:
    """`annotation` where OmegaConf can check it (primitives, optionals and lists of them), else Any."""
    primitives = (int, float, bool, str)
    if annotation in primitives:
        return annotation
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _omegaconf_type(next(arg for arg in args if arg is not type(None)))
        return Any if inner is Any else inner | None
    if origin is list and len(args) == 1 and args[0] in primitives:
        return annotation
    return Any


def _constant(value: Any) -> Any:
    return lambda: value


def signature_schema(cls: Any) -> type:
    """A dataclass with the arguments of `cls.__init__`, so OmegaConf checks key names and types.

    The class's own constructor checks the ranges (Python users get the same errors that way), so the
    callbacks and strategies need no hand-written copy of their argument list here.
    """
    hints = typing.get_type_hints(cls.__init__)
    required: list[Any] = []  # a dataclass lists fields without defaults first (a distillation teacher)
    fields: list[Any] = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))]
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = _omegaconf_type(hints.get(name, Any))
        default = parameter.default
        if default is inspect.Parameter.empty:
            required.append((name, annotation))
        elif isinstance(default, (list, dict, tuple)):
            fields.append((name, annotation, field(default_factory=_constant(default))))
        elif default is None or isinstance(default, (int, float, bool, str)):
            fields.append((name, annotation, field(default=default)))
        else:  # an object default (a nested compressor, a dataclass factory): the class checks it itself
            fields.append((name, Any, field(default=None)))
    return dataclasses.make_dataclass(f"{cls.__name__}Arguments", required + fields)


def validate_target_node(group: str, node: DictConfig) -> Any:
    """Validate one group's node: by its schema when we know its `_target_`, else check it imports."""
    target = node.get("_target_")
    check(isinstance(target, str), f"{group}._target_", target, "must name a class to instantiate")
    schema = SCHEMAS.get(target)
    if schema is not None:
        return _typed(schema, node, group)
    try:
        cls = get_class(target)
    except Exception as error:  # hydra raises several types for a missing module or attribute
        raise ConfigError(f"{group}._target_", target, f"cannot be imported ({error.__class__.__name__})") from None
    if group in CAPABILITY_GROUPS:
        _typed(signature_schema(cls), node, group)
    return node


def validate(cfg: DictConfig) -> ValidatedConfig:
    """Check every key of a composed config; raise one `ConfigError` for the first bad value."""
    run_keys = {f.name: cfg.get(f.name) for f in dataclasses.fields(RunConfig) if f.name in cfg}
    run = _typed(RunConfig, run_keys, "")
    trainer = _typed(TrainerConfig, cfg.trainer, "trainer")
    groups: dict[str, Any] = {name: validate_target_node(name, cfg[name]) for name in ("model", "data")}
    model_target, data_target = cfg.model._target_, cfg.data._target_
    wanted = MODEL_DATA.get(model_target)
    if wanted is not None and data_target in MODEL_DATA.values() and data_target != wanted:
        raise ConfigError("data._target_", data_target, f"model {model_target} needs data {wanted}")
    if model_target == TinyGPTConfig._target_ and data_target == TextDataConfig._target_:
        check(
            cfg.data.seq_len <= cfg.model.seq_len,
            "data.seq_len",
            cfg.data.seq_len,
            f"must be <= model.seq_len={cfg.model.seq_len}",
        )
    for name in CAPABILITY_GROUPS:
        node = cfg.get(name)
        groups[name] = validate_target_node(name, node) if node else None  # `none` members compose to {}
    for capability in CAPABILITIES:
        if capability.across_ranks is None or groups[capability.group] is None:
            continue
        name, target = capability.group, cfg[capability.group]._target_
        check(trainer.world_size() != 1, f"{name}._target_", target,
              f"{capability.across_ranks} between processes, but this trainer runs one; use trainer=ddp_cpu or "
              "trainer=ddp with trainer.devices >= 2")  # fmt: skip
        check_strategy(name, trainer.strategy)
    return ValidatedConfig(run=run, trainer=trainer, groups=groups)

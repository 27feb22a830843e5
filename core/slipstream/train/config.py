"""Training configuration: dataclasses, and loading them from a TOML file.

A TOML run file has six sections, each optional::

    [model]       name, max_seq_length, dtype, load_in_4bit, init, attn_implementation, accelerate, ...
    [data]        path, format, split, max_examples, completion_only, packing
    [lora]        r, alpha, dropout, target_modules, modules_to_save, gradient_checkpointing
    [train]       max_steps, epochs, batch_size, grad_accum, lr, schedule, warmup_steps, ...
    [checkpoint]  every, keep_last, resume
    [output]      dir, save_adapter, save_merged, merged_dtype, metrics, tensorboard

:class:`TrainConfig` is what :class:`~slipstream.train.trainer.Trainer` takes in Python; it holds the
``[train]``, ``[checkpoint]`` and ``[output]`` settings and ``[data]``'s ``completion_only`` and
``packing``. Relative paths are resolved against the current working directory.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key and the valid choices."""


def _key(section: str, key: str | None = None, **meta: Any) -> dict:
    return {"section": section, "key": key, **meta}


@dataclass
class ModelConfig:
    """``[model]``: what :meth:`FastModel.from_pretrained` loads."""

    name: str = "builtin:tiny-llama"
    max_seq_length: int = 2048
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    load_in_4bit: bool = False
    init: str = "auto"  # auto | pretrained | random
    attn_implementation: str = "sdpa"
    accelerate: bool = True  # swap modules onto slipstream ops (slipstream.models.accelerate)
    trust_remote_code: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        _choice("model", "dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        _choice("model", "init", self.init, ("auto", "pretrained", "random"))
        _positive("model", "max_seq_length", self.max_seq_length)


@dataclass
class DataConfig:
    """``[data]``: where the examples come from (``completion_only``/``packing`` live in TrainConfig)."""

    path: str = "builtin:stdlib-qa"
    format: str = "auto"  # auto | instruction | chat | text | tokens
    split: str = "train"
    max_examples: int | None = None

    def __post_init__(self) -> None:
        _choice("data", "format", self.format, ("auto", "instruction", "chat", "text", "tokens"))
        if self.max_examples is not None:
            _positive("data", "max_examples", self.max_examples)


@dataclass
class LoraConfig:
    """``[lora]``: the adapter :meth:`FastModel.get_peft_model` adds, and the checkpointing policy."""

    r: int = 16
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    gradient_checkpointing: bool | str = "auto"  # false | true | "lean" | "offload" | "auto"

    def __post_init__(self) -> None:
        _positive("lora", "r", self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"[lora] dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.gradient_checkpointing, str):
            _choice("lora", "gradient_checkpointing", self.gradient_checkpointing, ("auto", "lean", "offload"))


@dataclass
class TrainConfig:
    """Everything :class:`~slipstream.train.trainer.Trainer` needs besides the model, tokenizer and data.

    Steps: ``max_steps`` optimizer steps if given, else ``epochs`` passes over the (packed) rows.
    One step consumes ``batch_size * grad_accum`` rows; the loss of a step is the sum of token
    losses over the whole accumulated batch divided by its number of trained tokens.
    """

    # [train]
    max_steps: int | None = field(default=None, metadata=_key("train"))
    epochs: float = field(default=1.0, metadata=_key("train"))
    batch_size: int = field(default=2, metadata=_key("train"))
    grad_accum: int = field(default=1, metadata=_key("train"))
    lr: float = field(default=2e-4, metadata=_key("train"))
    schedule: str = field(default="cosine", metadata=_key("train"))  # cosine | linear | constant
    warmup_steps: int = field(default=0, metadata=_key("train"))
    warmup_ratio: float = field(default=0.0, metadata=_key("train"))
    min_lr_ratio: float = field(default=0.0, metadata=_key("train"))
    weight_decay: float = field(default=0.0, metadata=_key("train"))
    adam_beta1: float = field(default=0.9, metadata=_key("train"))
    adam_beta2: float = field(default=0.999, metadata=_key("train"))
    adam_eps: float = field(default=1e-8, metadata=_key("train"))
    max_grad_norm: float | None = field(default=1.0, metadata=_key("train"))
    precision: str = field(default="auto", metadata=_key("train"))  # auto | bf16 | fp16 | fp32
    seed: int = field(default=0, metadata=_key("train"))
    log_every: int = field(default=1, metadata=_key("train"))
    max_seq_length: int | None = field(default=None, metadata=_key("train"))  # None: the model's
    # device memory the "auto" checkpointing planner may plan for, weights included (GiB); None: all free
    max_memory_gib: float | None = field(default=None, metadata=_key("train"))
    # [data] (how examples become rows)
    completion_only: bool = field(default=True, metadata=_key("data"))
    packing: bool = field(default=True, metadata=_key("data"))
    # [checkpoint]
    save_every: int = field(default=0, metadata=_key("checkpoint", "every"))
    keep_last: int = field(default=2, metadata=_key("checkpoint", "keep_last"))
    resume: bool = field(default=False, metadata=_key("checkpoint", "resume"))
    # [output]
    output_dir: str = field(default="runs/slipstream", metadata=_key("output", "dir"))
    save_adapter: bool = field(default=True, metadata=_key("output", "save_adapter"))
    save_merged: bool = field(default=False, metadata=_key("output", "save_merged"))
    merged_dtype: str = field(default="auto", metadata=_key("output", "merged_dtype"))
    metrics: bool = field(default=True, metadata=_key("output", "metrics"))
    tensorboard: bool | str = field(default="auto", metadata=_key("output", "tensorboard"))

    def __post_init__(self) -> None:
        _choice("train", "schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice("train", "precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        _choice("output", "merged_dtype", self.merged_dtype, ("auto", "bf16", "fp16", "fp32"))
        for name in ("batch_size", "grad_accum", "log_every", "keep_last"):
            _positive("train", name, getattr(self, name))
        if self.max_memory_gib is not None and not self.max_memory_gib > 0:
            raise ConfigError(f"[train] max_memory_gib must be a positive number of GiB, got {self.max_memory_gib}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"[train] max_steps must be >= 0, got {self.max_steps}")
        if self.save_every < 0:
            raise ConfigError(f"[checkpoint] every must be >= 0 (0: no checkpoints), got {self.save_every}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"[train] warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if isinstance(self.tensorboard, str) and self.tensorboard != "auto":
            raise ConfigError(f"[output] tensorboard must be true, false or \"auto\", "
                              f"got {self.tensorboard!r}")


@dataclass
class RunConfig:
    """A whole run file: every section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str | None = None

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "lora": dataclasses.asdict(self.lora), "train": dataclasses.asdict(self.train)}


SECTIONS = ("model", "data", "lora", "train", "checkpoint", "output")


def section_keys() -> dict[str, dict[str, tuple[str, str]]]:
    """TOML section -> TOML key -> (which config object, its field name)."""
    table: dict[str, dict[str, tuple[str, str]]] = {s: {} for s in SECTIONS}
    for part, cls in (("model", ModelConfig), ("data", DataConfig), ("lora", LoraConfig)):
        for f in dataclasses.fields(cls):
            table[part][f.name] = (part, f.name)
    for f in dataclasses.fields(TrainConfig):
        table[f.metadata["section"]][f.metadata["key"] or f.name] = ("train", f.name)
    return table


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML run file; unknown sections or keys and mistyped values raise :class:`ConfigError`."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, *, source: str = "<dict>") -> RunConfig:
    table = section_keys()
    values: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "lora": {}, "train": {}}
    for section, body in raw.items():
        if section not in table:
            raise ConfigError(f"{source}: unknown section [{section}]; valid sections: "
                              f"{', '.join(f'[{s}]' for s in SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: `{section}` must be a [section] table, got {type(body).__name__}")
        for key, value in body.items():
            if key not in table[section]:
                raise ConfigError(f"{source}: unknown key `{key}` in [{section}]; valid keys: "
                                  f"{', '.join(sorted(table[section]))}")
            part, name = table[section][key]
            values[part][name] = value
    classes = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig}
    built = {}
    for part, cls in classes.items():
        hints = typing.get_type_hints(cls)
        for name, value in values[part].items():
            if not _accepts(hints[name], value):
                raise ConfigError(f"{source}: {_toml_name(cls, name, table)} must be "
                                  f"{_type_name(hints[name])}, got {value!r}")
        try:
            built[part] = cls(**values[part])
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return RunConfig(**built, source=source)


def _toml_name(cls: type, name: str, table: dict) -> str:
    for section, keys in table.items():
        for key, (part, fname) in keys.items():
            if fname == name and classes_of(part) is cls:
                return f"[{section}] {key}"
    return name


def classes_of(part: str) -> type:
    return {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig}[part]


def _accepts(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint) if h is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _choice(section: str, key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"[{section}] {key} must be one of {', '.join(map(repr, options))}, got {value!r}")


def _positive(section: str, key: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"[{section}] {key} must be a positive integer, got {value!r}")


__all__ = ["ConfigError", "DataConfig", "LoraConfig", "ModelConfig", "RunConfig", "TrainConfig",
           "config_from_dict", "load_config", "section_keys"]

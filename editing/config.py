"""``params.yaml`` read once into typed settings, as peft's ``LoraConfig``.

Each section is a frozen dataclass: its defaults are the documented values, its
``__post_init__`` the validation, and ``read_section`` the one reader that turns a parsed
YAML mapping into it (unknown keys, wrong types and bad values are errors that name the
key). This file holds the sections the ML core uses; ``tasks/settings.py`` adds the
pipeline's and reads the whole file.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Mapping

REPO_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
METHODS = ("baft", "reft", "lora")
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A missing, unknown or malformed setting in params.yaml; the message names the key."""


def params_path() -> Path:
    """``$LEDIT_PARAMS``, else the repository's ``params.yaml``."""
    return Path(os.environ.get("LEDIT_PARAMS", REPO_PARAMS))


def read_yaml(path: str | Path | None = None) -> dict:
    import yaml

    with open(path or params_path(), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or params_path()}: expected a mapping of sections")
    return raw


def merge(base: Mapping, overrides: Mapping) -> dict:
    """``base`` with the nested mapping ``overrides`` laid over it (a new dict)."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# -- the one reader ---------------------------------------------------------------------------
class Section:
    """Mixin of every settings dataclass: ``from_dict``, ``to_dict``, ``override``."""

    SECTION: ClassVar[str] = ""
    ERROR: ClassVar[type[ConfigError]] = ConfigError

    @classmethod
    def from_dict(cls, raw: Mapping | None):
        return read_section(cls, raw, cls.SECTION)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def override(self, changes: Mapping):
        """A validated copy with the nested ``changes`` applied."""
        return type(self).from_dict(merge(self.to_dict(), changes))

    def fail(self, key: str, expected: str) -> typing.NoReturn:
        raise self.ERROR(f"params.yaml {self.SECTION}.{key} must be {expected}, "
                         f"got {getattr(self, key)!r}")


def read_section(cls, raw: Mapping | None, where: str):
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    if raw is None and required:
        raise cls.ERROR(f"params.yaml {where} is missing" if "." in where
                        else f"params.yaml has no '{where}' section")
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise cls.ERROR(f"params.yaml {where or 'top level'} must be a mapping, got {raw!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise cls.ERROR(f"params.yaml {where or 'top level'}: unknown keys {unknown}; expected {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name in names:
        key = f"{where}.{name}" if where else name
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], key, cls.ERROR)
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = read_section(hints[name], None, key)
        elif name in required:
            raise cls.ERROR(f"params.yaml {key} is missing")
    return cls(**values)


def _coerce(hint, value, where: str, error: type[ConfigError]):
    if dataclasses.is_dataclass(hint):
        return read_section(hint, value, where)
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(hint, value, where, error)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise error(f"params.yaml {where} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, where, error) for v in value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise error(f"params.yaml {where} must be {_NAMES.get(hint, hint)}, got {value!r}")


_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _check(section: Section, key: str, ok: bool, expected: str) -> None:
    if not ok:
        section.fail(key, expected)


# -- the ML core's sections -------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig(Section):
    SECTION: ClassVar[str] = "model"
    name: str = "smollm2-135m"      # the embedded SmolLM2-135M-Instruct, or any HF directory
    dtype: str = "float32"
    threads: int = 0                # torch threads of the process loading it (0: torch's default)

    def __post_init__(self):
        _check(self, "dtype", self.dtype in DTYPES, f"one of {DTYPES}")
        _check(self, "threads", isinstance(self.threads, int) and self.threads >= 0, "a whole number >= 0")


@dataclass(frozen=True)
class EarlyStop(Section):
    SECTION: ClassVar[str] = "edit.early_stop"
    check_every: int = 10
    min_target_prob: float = 0.99

    def __post_init__(self):
        _check(self, "check_every", self.check_every >= 1, "at least 1")
        _check(self, "min_target_prob", 0 < self.min_target_prob <= 1, "in (0, 1]")


@dataclass(frozen=True)
class LossWeights(Section):
    SECTION: ClassVar[str] = "edit.loss_weights"
    edit: float = 1.0
    gate_positive: float = 0.1
    gate_negative: float = 1.0
    balance: float = 0.01
    continuation: float = 0.0
    query_positive: float = 0.1
    query_negative: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            _check(self, f.name, getattr(self, f.name) >= 0, "a number >= 0")


@dataclass(frozen=True)
class BaftConfig(Section):
    SECTION: ClassVar[str] = "edit.baft"
    gate_layer: int | None = 8
    bases_per_edit: int = 2
    sharpness: float = 30.0
    threshold: float = 0.8
    prefixes: int = 4
    prefix_tokens: int = 6
    subject_swaps: int = 3
    continuation_tokens: int = 0
    replay_negatives: int = 64
    gate_margin: float = 1.0
    gate_ceiling: float | None = 2.0
    text_negatives: int = 0
    text_negative_tokens: int = 16
    query_gate: bool = False
    relation_swaps: int = 6
    chat_positives: bool = False
    relation_positives: int = 0
    query_threshold: float = 0.6
    query_margin: float = 2.0
    query_ceiling: float | None = 1.0

    def __post_init__(self):
        _check(self, "gate_layer", self.gate_layer is None or self.gate_layer >= 0, "null or a layer >= 0")
        _check(self, "bases_per_edit", self.bases_per_edit >= 1, "at least 1")
        _check(self, "sharpness", self.sharpness > 0, "a number > 0")
        for key in ("threshold", "query_threshold"):
            _check(self, key, -1 <= getattr(self, key) <= 1, "a cosine in [-1, 1]")
        for key in ("prefixes", "prefix_tokens", "subject_swaps", "continuation_tokens", "replay_negatives",
                    "text_negatives", "text_negative_tokens", "relation_swaps", "relation_positives"):
            _check(self, key, getattr(self, key) >= 0, "a whole number >= 0")


@dataclass(frozen=True)
class LoraBaselineConfig(Section):
    """The FT-L style LoRA baseline, on the MLP down-projection of ``edit.layers``."""

    SECTION: ClassVar[str] = "edit.lora"
    rank: int = 8
    alpha: float = 16.0
    lr: float = 0.005

    def __post_init__(self):
        _check(self, "rank", self.rank >= 1, "at least 1")
        _check(self, "alpha", self.alpha > 0, "a number > 0")
        _check(self, "lr", self.lr > 0, "a number > 0")


@dataclass(frozen=True)
class EditConfig(Section):
    """How one block of edits is trained: the ``edit`` section."""

    SECTION: ClassVar[str] = "edit"
    method: str = "baft"
    layers: tuple[int, ...] = (20,)
    seed: int = 0
    steps: int = 40
    batch_size: int = 64
    lr: float = 0.02
    early_stop: EarlyStop = field(default_factory=EarlyStop)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    baft: BaftConfig = field(default_factory=BaftConfig)
    lora: LoraBaselineConfig = field(default_factory=LoraBaselineConfig)

    def __post_init__(self):
        _check(self, "method", self.method in METHODS, f"one of {METHODS}")
        _check(self, "layers", len(self.layers) > 0 and min(self.layers) >= 0, "a non-empty list of layers >= 0")
        _check(self, "steps", self.steps >= 1, "at least 1")
        _check(self, "batch_size", self.batch_size >= 1, "at least 1")
        _check(self, "lr", self.lr > 0, "a number > 0")


@dataclass(frozen=True)
class EvalConfig(Section):
    SECTION: ClassVar[str] = "eval"
    fluency_tokens: int = 32

    def __post_init__(self):
        _check(self, "fluency_tokens", self.fluency_tokens >= 0, "a whole number >= 0 (0: not measured)")


@dataclass(frozen=True)
class AuditConfig(Section):
    """``ledit why``: when an edit counts as fired, and how long an answer is explained."""

    SECTION: ClassVar[str] = "audit"
    fired_weight: float = 0.5
    answer_tokens: int = 24

    def __post_init__(self):
        _check(self, "fired_weight", 0 < self.fired_weight <= 1, "in (0, 1]")
        _check(self, "answer_tokens", self.answer_tokens >= 1, "at least 1")


def as_edit_config(config: EditConfig | Mapping | None) -> EditConfig:
    """``config`` as an ``EditConfig``: a mapping is read (and checked) as the ``edit`` section,
    None is ``params.yaml``'s. For callers holding a parsed YAML section (benchmarks, notebooks)."""
    if isinstance(config, EditConfig):
        return config
    if config is None:
        return EditConfig.from_dict(read_yaml().get("edit"))
    return EditConfig.from_dict(config)


"""The whole of ``params.yaml`` as typed settings: the ML core's sections
(``editing/config.py``) and the fact stream's and pipeline's, read once by ``load_settings``.

``tasks/`` and ``flows/`` take a ``Settings``; ``editing/`` takes only its sections
(``settings.edit``, ``settings.model``). Flows that receive settings as JSON (Prefect
deployment parameters) read them with ``Settings.from_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Mapping

from editing.config import (REPO_PARAMS, AuditConfig, ConfigError, EditConfig, EvalConfig, ModelConfig,
                            Section, _check, merge, read_yaml)

REPO = REPO_PARAMS.parent
SCOPES = ("batch", "cumulative")


class GateConfigError(ConfigError):
    """A missing or malformed threshold in params.yaml ``gate``."""


class ProbeConfigError(ConfigError):
    """A missing or malformed ``gate.probes`` setting in params.yaml."""


def repo_path(value: str) -> Path:
    """A path setting: absolute, or relative to the repository."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else REPO / p


@dataclass(frozen=True)
class DataSettings(Section):
    """The data version ``dvc repro`` rebuilds from (dvc.yaml: prepare)."""

    SECTION: ClassVar[str] = "data"
    home: str = "~/.ledit"
    tag: str = "latest"
    scope: str = "cumulative"

    def __post_init__(self):
        _check(self, "scope", self.scope in SCOPES, f"one of {SCOPES}")


@dataclass(frozen=True)
class IngestSettings(Section):
    """What one inbox file may cost; past a limit it is quarantined, never a failed run."""

    SECTION: ClassVar[str] = "ingest"
    max_file_bytes: int = 4 << 30       # JSON and CSV are read whole: memory ~ 2-3x this
    max_line_bytes: int = 1 << 20       # one JSONL line / JSON-array record / CSV row
    max_records: int = 10_000_000       # per file
    max_depth: int = 32                 # nesting of one record (the record itself is 1)
    max_read_attempts: int = 2          # runs that may die while reading one file

    def __post_init__(self):
        for f in fields(self):          # worded as the ingest has always refused it
            if getattr(self, f.name) < 1:
                raise ConfigError(f"params.yaml ingest.{f.name}: expected a positive integer, "
                                  f"got {getattr(self, f.name)!r}")


@dataclass(frozen=True)
class ProbeSettings(Section):
    """What the gate asks beyond the facts; the sizes are its cost."""

    SECTION: ClassVar[str] = "gate.probes"
    ERROR: ClassVar[type[ConfigError]] = ProbeConfigError
    standing_prompts: str
    standing_size: int         # the first N prompts, each asked plain and through the chat template
    standing_tokens: int       # greedy new tokens compared on each
    subject_probes: int         # per new fact: prompts on its subject's other relations
    subject_tokens: int         # new tokens of the base's recorded answer to each
    shown_changes: int          # per fact, changed answers generated for the report
    relation_templates: str
    strict_facts: int          # at most this many new facts get the generation checks
    strict_tokens: int         # greedy new tokens for chat success and repetition

    def __post_init__(self):
        for f in fields(self):
            if f.type == "int":
                _check(self, f.name, getattr(self, f.name) >= 0, "a whole number >= 0")

    def path(self, name: str) -> Path:
        return repo_path(getattr(self, name))


@dataclass(frozen=True)
class GateSettings(Section):
    """Promotion thresholds: a candidate is promoted only if every one holds. No defaults:
    a threshold left out of params.yaml is an error, never a silent pass."""

    SECTION: ClassVar[str] = "gate"
    ERROR: ClassVar[type[ConfigError]] = GateConfigError
    min_reliability: float
    min_generality: float
    min_retention: float
    min_locality: float
    max_drift: float
    min_relation_specificity: float
    min_standing_locality: float
    min_chat_success: float
    max_repetition_excess: float
    fact_min_reliability: float
    fact_min_generality: float
    fact_min_relation_specificity: float
    probes: ProbeSettings

    def thresholds(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "probes"}


@dataclass(frozen=True)
class PipelineSettings(Section):
    SECTION: ClassVar[str] = "pipeline"
    experiment: str = "ledit"
    registered_model: str = "baft-adapter-set"
    schedule: str = "0 2 * * *"
    timezone: str = "UTC"
    lock_timeout_s: float = 21600.0     # -1: wait forever
    tracking_timeout_s: float = 10.0
    shards: int = 1
    max_attempts: int = 3
    fact_tags: int = 200
    drift_texts: str = "data/samples/drift-text.txt"
    log_pyfunc: bool = True

    def __post_init__(self):
        _check(self, "lock_timeout_s", self.lock_timeout_s >= 0 or self.lock_timeout_s == -1, ">= 0, or -1")
        _check(self, "tracking_timeout_s", self.tracking_timeout_s > 0, "a number > 0")
        _check(self, "shards", self.shards >= 1, "at least 1")
        _check(self, "max_attempts", self.max_attempts >= 1, "at least 1")
        _check(self, "fact_tags", self.fact_tags >= 0, "a whole number >= 0")


@dataclass(frozen=True)
class ServingSettings(Section):
    """The served chat model (tasks/pipeline/chat.py); logged into its model_config, since
    the server process does not read params.yaml."""

    SECTION: ClassVar[str] = "serving"
    trace: bool = False                 # each served chat request as an MLflow trace
    max_input_tokens: int = 2048        # a longer rendered chat prompt is refused (400)
    max_tokens: int = 256               # the most new tokens one request may ask for
    default_max_tokens: int = 64        # a request without max_tokens gets this many
    max_batch: int = 8                  # requests generated together in one batch
    batch_wait_ms: float = 5.0          # how long the first request waits for others
    threads: int = 0                    # torch threads of the serving process (0: every core)

    def __post_init__(self):
        for name in ("max_input_tokens", "max_tokens", "default_max_tokens", "max_batch"):
            _check(self, name, getattr(self, name) >= 1, "a whole number >= 1")
        _check(self, "default_max_tokens", self.default_max_tokens <= self.max_tokens, "<= max_tokens")
        _check(self, "threads", self.threads >= 0, "a whole number >= 0")
        _check(self, "batch_wait_ms", self.batch_wait_ms >= 0, "a number >= 0")


@dataclass(frozen=True, kw_only=True)
class Settings(Section):
    """Every hyperparameter and threshold of the project: ``params.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataSettings = field(default_factory=DataSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    gate: GateSettings
    audit: AuditConfig = field(default_factory=AuditConfig)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)


def load_settings(path: str | Path | None = None, overrides: Mapping | None = None) -> Settings:
    """``params.yaml`` (``$LEDIT_PARAMS``, else the repository's), with optional nested
    ``overrides`` laid over it, read and checked once."""
    return Settings.from_dict(merge(read_yaml(path), overrides or {}))


def as_settings(settings: Settings | Mapping | None) -> Settings:
    """A flow's ``params`` argument as ``Settings``: None means ``params.yaml``; a mapping
    (a deployment's JSON parameters) is read and checked."""
    if isinstance(settings, Settings):
        return settings
    return load_settings() if settings is None else Settings.from_dict(settings)

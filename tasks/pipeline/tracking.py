"""MLflow runs and the model registry for pipeline runs.

- One experiment (``pipeline.experiment``); one parent run per flow run, a nested run for
  the evaluation (and, in the sharded path, one per shard).
- Everything goes through ``MlflowClient`` with explicit run ids: no fluent "active run",
  which is thread-local and would be lost between Prefect tasks.
- The registry: ``create_registered_model`` + ``create_model_version(source="runs:/...")``
  (``register_model`` refuses a plain directory); the alias ``production`` lives on the client.
- The store (where, and whether it answers) is ``tracking_store``; what a run logs beyond
  params, metrics and tags is ``tracking_artifacts``. Callers use this module for all three.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tasks.pipeline.tracking_artifacts import (ADAPTER_ARTIFACT, log_adapter_set, log_evaluation,
                                               log_history_plot, log_inputs)
from tasks.pipeline.tracking_store import (TrackingUnavailable, artifact_root, check_available, client,
                                           tracking_uri)
from tasks.settings import Settings
from tasks.stream.workspace import Home

__all__ = ["ADAPTER_ARTIFACT", "PRODUCTION_ALIAS", "TrackingUnavailable", "client", "code_version", "end_run",
           "flatten", "log_adapter_set", "log_evaluation", "log_history_plot", "log_inputs", "log_metrics",
           "log_params", "log_tags", "production_alias", "register_candidate", "registered_model_name",
           "set_production_alias", "set_version_tags", "start_child_run", "start_run", "tracking_uri"]

PRODUCTION_ALIAS = "production"
_MAX_TAG = 5000          # MLflow's tag value limit is 8000; keep room
_REPO = Path(__file__).resolve().parents[2]


def experiment_id(cl, home: Home, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return cl.create_experiment(name, artifact_location=artifact_root(home))
    except MlflowException:        # created meanwhile by another process
        return cl.get_experiment_by_name(name).experiment_id


def registered_model_name(settings: Settings) -> str:
    return settings.pipeline.registered_model


# -- small helpers ---------------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Settings as MLflow params: ``{"edit": {"baft": {"gate_layer": 8}}}`` ->
    ``{"edit.baft.gate_layer": "8"}``."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def code_version() -> str:
    """The git commit of this code, with ``+dirty`` when the tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _tag_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _MAX_TAG else text[:_MAX_TAG - 3] + "..."


def _safe_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def log_tags(cl, run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(_safe_key(k), _tag_value(v)) for k, v in tags.items() if v is not None]
    for i in range(0, len(items), 100):
        cl.log_batch(run_id, tags=items[i:i + 100])


def log_metrics(cl, run_id: str, metrics: dict, step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(_safe_key(k), float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    for i in range(0, len(items), 500):
        cl.log_batch(run_id, metrics=items[i:i + 500])


def log_params(cl, run_id: str, values: dict) -> None:
    from mlflow.entities import Param

    items = [Param(_safe_key(k), str(v)[:6000]) for k, v in values.items()]
    for i in range(0, len(items), 100):
        cl.log_batch(run_id, params=items[i:i + 100])


# -- runs --------------------------------------------------------------------------------
def start_run(home: Home, settings: Settings, *, run_name: str, tags: dict) -> str:
    """A parent run with every setting, the code version and ``tags``.

    The run's first MLflow call: an unavailable store fails it here, before training."""
    check_available(home, settings.pipeline.tracking_timeout_s)
    cl = client(home)
    exp = experiment_id(cl, home, settings.pipeline.experiment)
    commit = code_version()
    run = cl.create_run(exp, run_name=run_name, tags={
        "mlflow.source.git.commit": commit.removesuffix("+dirty"), "ledit.code_version": commit,
        "mlflow.source.name": "ledit pipeline"})
    log_params(cl, run.info.run_id, {**flatten(settings.to_dict()), "code_version": commit})
    log_tags(cl, run.info.run_id, tags)
    return run.info.run_id


def start_child_run(home: Home, parent_run_id: str, run_name: str, tags: dict | None = None) -> str:
    cl = client(home)
    parent = cl.get_run(parent_run_id)
    run = cl.create_run(parent.info.experiment_id, run_name=run_name,
                        tags={"mlflow.parentRunId": parent_run_id, **(tags or {})})
    return run.info.run_id


def end_run(home: Home, run_id: str, status: str = "FINISHED") -> None:
    client(home).set_terminated(run_id, status)


# -- the registry ------------------------------------------------------------------------
def register_candidate(home: Home, settings: Settings, run_id: str, *, source: str, tags: dict,
                       description: str = "", model_id: str | None = None) -> str:
    """One model version per candidate; returns its version number (as MLflow's string)."""
    from mlflow.exceptions import MlflowException

    cl = client(home)
    name = registered_model_name(settings)
    try:
        cl.create_registered_model(name, description="BaFT adapter sets of the ledit pipeline; "
                                   "alias 'production' is the promoted one")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    mv = cl.create_model_version(name, source=source, run_id=run_id, description=description,
                                 model_id=model_id,
                                 tags={_safe_key(k): _tag_value(v) for k, v in tags.items()
                                       if v is not None})
    return str(mv.version)


def set_version_tags(home: Home, settings: Settings, model_version: str, tags: dict) -> None:
    cl = client(home)
    name = registered_model_name(settings)
    for k, v in tags.items():
        if v is not None:
            cl.set_model_version_tag(name, str(model_version), _safe_key(k), _tag_value(v))


def set_production_alias(home: Home, settings: Settings, model_version: str) -> None:
    client(home).set_registered_model_alias(registered_model_name(settings), PRODUCTION_ALIAS,
                                            str(model_version))


def production_alias(home: Home, settings: Settings) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client(home).get_model_version_by_alias(registered_model_name(settings), PRODUCTION_ALIAS)
    except MlflowException:     # no model or no alias; an outage raises TrackingUnavailable
        return None
    return str(mv.version)

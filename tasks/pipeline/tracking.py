"""MLflow tracking and the model registry for pipeline runs.

- Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///$LEDIT_HOME/mlflow.db`` with
  artifacts under ``$LEDIT_HOME/mlartifacts`` (the file store is an error since MLflow 3.13).
- One experiment (params ``pipeline.experiment``); one parent run per flow run, a nested run
  for the evaluation (and, in the sharded path, one per shard).
- Everything goes through ``MlflowClient`` with explicit run ids: no fluent "active run",
  which is thread-local and would be lost between Prefect tasks.
- The registry: ``create_registered_model`` + ``create_model_version(source="runs:/...")``
  (``register_model`` refuses a plain directory); the alias ``production`` lives on the client.
- An unavailable store (a locked or missing SQLite database, a server that does not answer)
  raises ``TrackingUnavailable``, naming the URI and the cause. ``start_run`` checks first
  (``check_available``), waiting at most params ``pipeline.tracking_timeout_s`` (default 10 s)
  for a lock, so a run fails before training. Later calls wait as MLflow does (a 20 s SQLite
  busy timeout per call; HTTP retries bounded here to 3, 60 s each, unless set in the env).
"""
from __future__ import annotations

import functools
import json
import os
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tasks.stream.workspace import Home

PRODUCTION_ALIAS = "production"
ADAPTER_ARTIFACT = "adapter_set"
_MAX_TAG = 5000          # MLflow's tag value limit is 8000; keep room
_REPO = Path(__file__).resolve().parents[2]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# MLflow's defaults (7 retries, 120 s each) keep a call to a dead server going for minutes
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
DEFAULT_TIMEOUT_S = 10.0


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be used now (locked, missing, not answering).

    Not an ``MlflowException`` on purpose: code that catches those for "not found" or
    "already exists" must not mistake an outage for an answer."""

    def __init__(self, uri: str, cause: str):
        self.uri, self.cause = uri, cause
        source = " (MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") else ""
        super().__init__(f"MLflow tracking store {_display_uri(uri)}{source} is unavailable: {cause}")

    def __reduce__(self):          # pickles (Prefect states, Ray) with both arguments
        return type(self), (self.uri, self.cause)


def _display_uri(uri: str) -> str:
    """The URI without a password."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]


def _os_reason(exc: BaseException) -> str:
    """``[Errno 111] Connection refused`` out of urllib3's nested retry message, if there."""
    import re

    found = re.search(r"\[Errno -?\d+\][^'\")]*", str(exc))
    return found.group(0).strip() if found else _first_line(exc)


def unavailable_cause(exc: BaseException) -> str | None:
    """Why ``exc`` means the store is unavailable, or None if it is some other error."""
    import requests
    import sqlalchemy.exc

    for e in _chain(exc):
        if isinstance(e, TrackingUnavailable):
            return e.cause
        if isinstance(e, (sqlite3.OperationalError, sqlalchemy.exc.OperationalError)):
            text = str(getattr(e, "orig", None) or e)
            if "locked" in text or "busy" in text:
                return "the database is locked by another process (MLflow's wait for it ran out)"
            return _first_line(e)
        if isinstance(e, requests.exceptions.RequestException):
            return f"no answer from the server: {_os_reason(e)}"
    if getattr(exc, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "WORKSPACE_TEMPORARILY_UNAVAILABLE"):
        return _first_line(exc)
    return None


def _guarded(fn, uri: str):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TrackingUnavailable:
            raise
        except Exception as exc:
            cause = unavailable_cause(exc)
            if cause is None:
                raise
            raise TrackingUnavailable(uri, cause) from exc
    return call


class _Client:
    """``MlflowClient`` whose calls raise ``TrackingUnavailable`` when the store is."""

    def __init__(self, inner, uri: str):
        self._inner, self._uri = inner, uri

    def __getattr__(self, name):
        if name in ("_inner", "_uri"):      # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        value = getattr(self._inner, name)
        return _guarded(value, self._uri) if callable(value) else value


# -- where -----------------------------------------------------------------------------
def tracking_uri(home: Home) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home.root / 'mlflow.db'}"


def artifact_root(home: Home) -> str | None:
    """With a local database, artifacts go under LEDIT_HOME (not ./mlruns in the working
    directory); a tracking server chooses its own."""
    if not tracking_uri(home).startswith("sqlite:"):
        return None
    return (home.root / "mlartifacts").as_uri()


def client(home: Home):
    from mlflow import MlflowClient

    uri = tracking_uri(home)
    return _Client(_guarded(MlflowClient, uri)(tracking_uri=uri, registry_uri=uri), uri)


def check_available(home: Home, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise ``TrackingUnavailable`` unless the store answers within ``timeout`` seconds.

    SQLite: the directory must exist (MLflow would create it, but a missing directory is far
    more often an unmounted volume or a typo than a new store) and a write lock must be had
    in time. HTTP: the REST API answers, without a server error. Other stores: one read
    through MLflow."""
    uri = tracking_uri(home)
    if uri.startswith("sqlite:///"):
        cause = _sqlite_cause(Path(uri.removeprefix("sqlite:///").split("?")[0]), timeout)
    elif uri.startswith(("http://", "https://")):
        cause = _http_cause(uri, timeout)
    else:
        client(home).search_experiments(max_results=1)
        return
    if cause:
        raise TrackingUnavailable(uri, cause)


def _sqlite_cause(path: Path, timeout: float) -> str | None:
    if not path.parent.exists():
        return (f"directory {path.parent} does not exist (an unmounted volume or a wrong URI?); "
                "create it to start a new store there")
    if not path.parent.is_dir():
        return f"{path.parent} is not a directory"
    if not path.exists():
        return None if os.access(path.parent, os.W_OK) else f"cannot create {path}: directory not writable"
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")        # the write lock every MLflow write needs
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return (f"the database {path} is locked by another process "
                    f"(no write access within {timeout:g} s)")
        return f"cannot use the database {path}: {exc}"
    return None


def _http_cause(uri: str, timeout: float) -> str | None:
    import requests

    verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or \
        os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    # a call MLflow itself makes; without credentials a secured server says 401, which will do
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    shown = _display_uri(uri)
    try:
        answer = requests.get(url, timeout=timeout, verify=verify)
    except requests.exceptions.Timeout:
        return f"no answer from {shown} within {timeout:g} s"
    except requests.exceptions.RequestException as exc:
        return f"cannot connect to {shown}: {_os_reason(exc)}"
    if answer.status_code == 404:
        return f"{shown} answers, but not as an MLflow tracking server (HTTP 404 for its REST API)"
    if answer.status_code >= 500:
        return f"{shown} answered HTTP {answer.status_code}"
    return None


def experiment_id(cl, home: Home, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return cl.create_experiment(name, artifact_location=artifact_root(home))
    except MlflowException:        # created meanwhile by another process
        return cl.get_experiment_by_name(name).experiment_id


def registered_model_name(params: dict) -> str:
    return params.get("pipeline", {}).get("registered_model", "baft-adapter-set")


# -- small helpers ---------------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """params.yaml as MLflow params: ``edit.baft.gate_layer`` -> "8"."""
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


def log_params(cl, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(_safe_key(k), str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        cl.log_batch(run_id, params=items[i:i + 100])


# -- the dataset: a DVC-versioned batch --------------------------------------------------
def _dvc_source_class():
    from mlflow.data.dataset_source import DatasetSource

    class DVCDatasetSource(DatasetSource):
        """A batch file in the git + DVC data workspace at a git tag."""

        def __init__(self, repo: str, path: str, rev: str, md5: str | None = None):
            self.repo, self.path, self.rev, self.md5 = repo, path, rev, md5

        @staticmethod
        def _get_source_type() -> str:
            return "dvc"

        def load(self, dst_path=None) -> str:
            import dvc.api

            dst = Path(dst_path or tempfile.mkdtemp()) / Path(self.path).name
            with dvc.api.open(self.path, repo=self.repo, rev=self.rev, mode="rb") as f:
                dst.write_bytes(f.read())
            return str(dst)

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith("dvc://")

        @classmethod
        def _resolve(cls, raw_source: str):
            body, _, rev = raw_source.removeprefix("dvc://").rpartition("@")
            repo, _, path = body.partition("::")
            return cls(repo, path, rev)

        def to_dict(self) -> dict:
            return {"url": f"dvc://{self.repo}::{self.path}@{self.rev}", "repo": self.repo,
                    "path": self.path, "rev": self.rev, "git_tag": self.rev, "dvc_md5": self.md5}

        @classmethod
        def from_dict(cls, d: dict):
            return cls(d["repo"], d["path"], d["rev"], d.get("dvc_md5"))

    return DVCDatasetSource


def batch_dataset_input(home: Home, tag: str, md5: str, frame=None):
    """The batch as an MLflow dataset input: name = git tag, digest = DVC md5 (polars' own
    digest differs between versions), source = the file in the workspace at that tag."""
    import mlflow.data
    import polars as pl
    from mlflow.entities import DatasetInput, InputTag

    rel = f"batches/{tag}.parquet"
    if frame is None:
        local = home.workspace / rel
        if local.exists():
            frame = pl.read_parquet(local)
        else:
            from tasks.stream.prepare import read_batch
            frame = read_batch(home, tag)
    source = _dvc_source_class()(str(home.workspace), rel, tag, md5)
    ds = mlflow.data.from_polars(frame, source=source, name=tag, digest=md5)
    return DatasetInput(dataset=ds._to_mlflow_entity(),
                        tags=[InputTag("mlflow.data.context", "training")])


# -- runs --------------------------------------------------------------------------------
def start_run(home: Home, params: dict, *, run_name: str, tags: dict) -> str:
    """A parent run with every param of params.yaml, the code version and ``tags``.

    The run's first MLflow call: an unavailable store fails it here, before training."""
    check_available(home, float(params.get("pipeline", {}).get("tracking_timeout_s", DEFAULT_TIMEOUT_S)))
    cl = client(home)
    exp = experiment_id(cl, home, params.get("pipeline", {}).get("experiment", "ledit"))
    commit = code_version()
    run = cl.create_run(exp, run_name=run_name, tags={
        "mlflow.source.git.commit": commit.removesuffix("+dirty"), "ledit.code_version": commit,
        "mlflow.source.name": "ledit pipeline"})
    log_params(cl, run.info.run_id, {**flatten(params), "code_version": commit})
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


def log_inputs(home: Home, run_id: str, batches: list[dict]) -> None:
    if batches:
        client(home).log_inputs(run_id, datasets=[batch_dataset_input(home, b["tag"], b["dvc_md5"])
                                                  for b in batches])


def log_adapter_set(home: Home, run_id: str, directory: str | Path) -> str:
    """The candidate adapter set as the run's ``adapter_set`` artifact; returns its URI."""
    cl = client(home)
    cl.log_artifacts(run_id, str(directory), ADAPTER_ARTIFACT)
    return f"runs:/{run_id}/{ADAPTER_ARTIFACT}"


def log_evaluation(home: Home, run_id: str, evaluation: dict, version: str) -> None:
    """Per-fact results as Parquet and as an MLflow table, the means as JSON and Markdown."""
    import polars as pl

    cl = client(home)
    rows = evaluation["per_fact"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "evaluation"
        out.mkdir()
        if rows:
            pl.DataFrame(rows, infer_schema_length=None).write_parquet(out / "per_fact.parquet")
        (out / "metrics.json").write_text(json.dumps(evaluation["metrics"], indent=2, sort_keys=True))
        for name in ("notes", "changed"):     # why a check was not measured; the answers it changed
            if evaluation.get(name):
                (out / f"{name}.json").write_text(json.dumps(evaluation[name], indent=1, ensure_ascii=False))
        (out / "summary.md").write_text(metrics_markdown(evaluation["metrics"], version))
        cl.log_artifacts(run_id, str(out), "evaluation")
    if rows:
        table = {k: [r.get(k) for r in rows] for k in rows[0]}
        cl.log_table(run_id, table, "evaluation/per_fact_table.json")


def metrics_markdown(metrics: dict, version: str) -> str:
    lines = [f"### Evaluation of {version}", "", "| metric | value |", "|---|---|"]
    for k in sorted(metrics):
        v = metrics[k]
        lines.append(f"| {k} | {'-' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)} |")
    return "\n".join(lines) + "\n"


def log_history_plot(home: Home, run_id: str, records: list[dict]) -> None:
    """Quality and retention across versions (every candidate, rejected ones marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("metrics")]
    if not rows:
        return
    versions = [r["version"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(rows) + 3), 3.5))
    for metric in ("reliability", "generality", "retention", "locality"):
        ys = [r["metrics"].get(metric) for r in rows]
        ax.plot(versions, [float("nan") if y is None else y for y in ys], marker="o", label=metric)
    for i, r in enumerate(rows):
        if r.get("status") == "rejected":
            ax.axvspan(i - 0.4, i + 0.4, color="red", alpha=0.08)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("adapter version (red: rejected)")
    ax.set_title("Edit quality and retention across versions")
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    client(home).log_figure(run_id, fig, "plots/quality_across_versions.png")
    plt.close(fig)


# -- the registry ------------------------------------------------------------------------
def register_candidate(home: Home, params: dict, run_id: str, *, source: str, tags: dict,
                       description: str = "", model_id: str | None = None) -> str:
    """One model version per candidate; returns its version number (as MLflow's string)."""
    from mlflow.exceptions import MlflowException

    cl = client(home)
    name = registered_model_name(params)
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


def set_version_tags(home: Home, params: dict, model_version: str, tags: dict) -> None:
    cl = client(home)
    name = registered_model_name(params)
    for k, v in tags.items():
        if v is not None:
            cl.set_model_version_tag(name, str(model_version), _safe_key(k), _tag_value(v))


def set_production_alias(home: Home, params: dict, model_version: str) -> None:
    client(home).set_registered_model_alias(registered_model_name(params), PRODUCTION_ALIAS,
                                            str(model_version))


def production_alias(home: Home, params: dict) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client(home).get_model_version_by_alias(registered_model_name(params), PRODUCTION_ALIAS)
    except MlflowException:     # no model or no alias; an outage raises TrackingUnavailable
        return None
    return str(mv.version)

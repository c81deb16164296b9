"""Where the MLflow tracking store is, and whether it answers.

- ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///$LEDIT_HOME/mlflow.db`` with artifacts
  under ``$LEDIT_HOME/mlartifacts`` (the file store is an error since MLflow 3.13).
- An unavailable store (a locked or missing SQLite database, a server that does not answer)
  raises ``TrackingUnavailable``, naming the URI and the cause: every ``client`` call does,
  and ``check_available`` asks first, within a timeout, so a run fails before training.
  Later calls wait as MLflow does (a 20 s SQLite busy timeout per call; HTTP retries bounded
  here to 3, 60 s each, unless set in the env).
"""
from __future__ import annotations

import functools
import os
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tasks.stream.workspace import Home

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# MLflow's defaults (7 retries, 120 s each) keep a call to a dead server going for minutes
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


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


def check_available(home: Home, timeout: float) -> None:
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

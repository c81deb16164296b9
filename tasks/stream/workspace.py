"""The data workspace under ``LEDIT_HOME``: where every fact update lives.

Layout (created on first use, or explicitly by ``ledit init``)::

    $LEDIT_HOME/                  default ~/.ledit, or --home, or $LEDIT_HOME
      config.json                 inbox URL and DVC remote URL
      inbox/                      drop zone (the default inbox; any fsspec URL may replace it)
      archive/<sha[:2]>/<sha>-<name>   every file taken in, exactly as it arrived; never deleted
      quarantine/<run_id>/rejects.jsonl  bad records: file, line, record, field, reason, raw text
      workspace/                  git + DVC repository: batches/<tag>.parquet(.dvc), batches/<tag>.json
      remote/                     the default DVC remote (a local directory)
      state/
        journal.json              the run in progress (crash recovery), absent when idle
        ledger/files.jsonl        content hash of every file ever taken in
        ledger/facts.parquet      latest accepted version of every fact
        ledger/applied.parquet    edits the training pipeline has applied (mark_applied)
        runs/<run_id>/            per-run staging, duplicates.parquet, report.json
      .lock                       held by ingest, mark_applied and init (filelock)

Plain functions only; nothing here imports Prefect.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "LEDIT_HOME"
DEFAULT_HOME = "~/.ledit"
CONFIG_VERSION = 1


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """``home``, else ``$LEDIT_HOME``, else ``~/.ledit``; made absolute."""
    raw = home if home not in (None, "") else os.environ.get(ENV_HOME) or DEFAULT_HOME
    return Path(os.path.expanduser(os.fspath(raw))).resolve()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file or nothing: temp file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


@dataclass(frozen=True)
class Home:
    """Paths of one LEDIT_HOME. Cheap to build; ``ensure()`` creates the directories."""

    root: Path

    @classmethod
    def at(cls, home: str | os.PathLike | None = None) -> "Home":
        return cls(resolve_home(home))

    # -- paths ---------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def default_inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def batches(self) -> Path:
        return self.workspace / "batches"

    @property
    def default_remote(self) -> Path:
        return self.root / "remote"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def journal(self) -> Path:
        return self.state / "journal.json"

    @property
    def ledger(self) -> Path:
        return self.state / "ledger"

    @property
    def runs(self) -> Path:
        return self.state / "runs"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    # -- config --------------------------------------------------------------
    def config(self) -> dict:
        """The stored config, or the defaults if ``init`` has not written one."""
        defaults = {"version": CONFIG_VERSION, "inbox": str(self.default_inbox),
                    "remote": str(self.default_remote), "remote_name": "storage"}
        try:
            stored = json.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return defaults
        return {**defaults, **stored}

    @property
    def inbox_url(self) -> str:
        return self.config()["inbox"]

    def ensure(self) -> "Home":
        """Create the plain directories (not the git/DVC workspace; see ``init_workspace``)."""
        for p in (self.root, self.archive, self.quarantine, self.ledger, self.runs,
                  self.default_remote):
            p.mkdir(parents=True, exist_ok=True)
        inbox = self.inbox_url
        if "://" not in inbox or inbox.startswith("file://"):
            Path(inbox.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        return self

    def lock(self, timeout: float = -1):
        """The workspace lock (a ``filelock.FileLock``); ``timeout`` seconds, -1 waits forever."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.lock_path), timeout=timeout)


def is_initialised(home: Home) -> bool:
    return (home.workspace / ".dvc").is_dir() and (home.workspace / ".git").exists()


def init_workspace(home: str | os.PathLike | Home | None = None, *, inbox: str | None = None,
                   remote: str | None = None) -> Home:
    """Create (or update) LEDIT_HOME: directories, config, and the git + DVC workspace.

    Idempotent. ``inbox`` may be any fsspec URL; ``remote`` any DVC remote URL (default:
    ``$LEDIT_HOME/remote``). Safe against a concurrent ingest: it takes the workspace lock.
    """
    h = home if isinstance(home, Home) else Home.at(home)
    with h.lock():
        return _init_locked(h, inbox=inbox, remote=remote)


def _init_locked(h: Home, *, inbox: str | None = None, remote: str | None = None) -> Home:
    from tasks.stream import version

    h.root.mkdir(parents=True, exist_ok=True)
    cfg = h.config()
    changed = not h.config_path.exists()
    if inbox is not None and inbox != cfg["inbox"]:
        cfg["inbox"], changed = inbox, True
    if remote is not None and remote != cfg["remote"]:
        cfg["remote"], changed = remote, True
    if changed:
        atomic_write_json(h.config_path, cfg)
    h.ensure()
    version.init_repo(h.workspace, remote_url=cfg["remote"], remote_name=cfg["remote_name"])
    return h


def ensure_initialised(h: Home) -> Home:
    """Create the workspace on first use (caller holds the lock)."""
    if not is_initialised(h) or not h.config_path.exists():
        _init_locked(h)
    else:
        h.ensure()
    return h

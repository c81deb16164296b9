"""The process a pipeline command runs in: offline, and on a Prefect API under LEDIT_HOME.

Without ``PREFECT_API_URL`` flows run on Prefect's ephemeral API, whose SQLite database is put
under LEDIT_HOME (``prefect.db``), the same one ``ledit server`` serves, so the runs show in
its UI. Only the standard library here: the commands import Prefect after ``prepare_env``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from editing import offline


def prepare_env(home: Path) -> None:
    """Offline defaults, and the ephemeral Prefect API's database under LEDIT_HOME.

    Prefect reads its settings when first imported, so this changes nothing once it is (tests
    run inside ``prefect_test_harness``)."""
    offline.apply()
    if "prefect" in sys.modules or os.environ.get("PREFECT_API_URL"):
        return
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def start_prefect_api(home: Path) -> None:
    """Start this process's ephemeral Prefect API under a file lock in LEDIT_HOME.

    Several triggers started at once would each start a server on the same new prefect.db
    and race on its migrations ("table ... already exists"); one at a time, the first
    migrates and the rest find the schema current. The server then lives until the process
    exits, so the flow reuses it; if the process is killed outright (SIGKILL, the OOM
    killer), the kernel stops the server too instead of leaving it orphaned."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from filelock import FileLock
    from prefect.client.orchestration import get_client

    with FileLock(str(home / ".prefect-start.lock")), _children_die_with_us():
        with get_client(sync_client=True) as client:
            client.api_healthcheck()


class _children_die_with_us:
    """While inside, processes started with ``subprocess.Popen`` get SIGTERM when this
    process dies (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing changes). Prefect starts
    its ephemeral server with a plain Popen and stops it only from ``atexit``."""

    def __enter__(self):
        if not sys.platform.startswith("linux"):
            return self
        self._popen = subprocess.Popen
        real = self._popen

        def popen(*args, **kwargs):
            kwargs.setdefault("preexec_fn", _die_with_parent)
            return real(*args, **kwargs)

        subprocess.Popen = popen
        return self

    def __exit__(self, *exc):
        if hasattr(self, "_popen"):
            subprocess.Popen = self._popen


def _die_with_parent() -> None:   # in the child, between fork and exec
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1: PR_SET_PDEATHSIG

"""``ledit server`` stops what it started (issue 15): after a SIGTERM, as after Ctrl-C, the
Prefect server, the MLflow server and every process they started are gone and both ports
are free."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (Linux /proc)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop, started_by_script", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm", "sigint-started-in-the-background"])
def test_server_stops_everything_it_started(tmp_path, stop, started_by_script):
    """SIGTERM (what systemd, docker stop and kill send), and SIGINT (Ctrl-C) to a server a
    script started in the background, where SIGINT arrives ignored (``cmd &``)."""
    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(ROOT)
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "server", "--home", str(tmp_path / "home"),
         "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_ignore_sigint if started_by_script else None)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while not (listening(prefect_port) and listening(mlflow_port)):
            assert server.poll() is None, "ledit server exited before both servers listened"
            assert time.monotonic() < deadline, "the servers did not start within 240 s"
            time.sleep(1)
        started = descendants(server.pid)
        assert len(started) >= 2
        server.send_signal(stop)
        assert server.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not listening(prefect_port) and not listening(mlflow_port)
        assert [p for p in started if alive(p)] == []
    finally:                             # a failed stop must not leave servers behind
        for pid in started | descendants(server.pid) | ({server.pid} if server.poll() is None else set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

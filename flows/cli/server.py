"""``ledit server``: the Prefect server and the MLflow UI on SQLite under LEDIT_HOME, until
Ctrl-C or SIGTERM, and then nothing they started is left running."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from editing.offline import OFFLINE_ENV
from flows.cli.common import fail, home_option, home_path


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def server_commands(home: Path, host: str = "127.0.0.1", prefect_port: int = 4200,
                    mlflow_port: int = 5000) -> list[tuple[str, list[str], dict]]:
    """The Prefect server and the MLflow UI, both on ``host`` with SQLite under ``home``."""
    env = {**os.environ, **OFFLINE_ENV,
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
           "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port)}
    env.pop("PREFECT_API_URL", None)
    prefect = [_tool("prefect"), "server", "start", "--host", host, "--port", str(prefect_port)]
    mlflow = [_tool("mlflow"), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
              "--default-artifact-root", str(home / "mlartifacts"), "--host", host,
              "--port", str(mlflow_port)]
    return [("prefect", prefect, env), ("mlflow", mlflow, {**os.environ, **OFFLINE_ENV})]


@click.command("server")
@home_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (anything else exposes the UIs beyond this machine).")
@click.option("--prefect-port", default=4200, show_default=True)
@click.option("--mlflow-port", default=5000, show_default=True)
def server_cmd(home, host, prefect_port, mlflow_port):
    """Start the Prefect server and the MLflow UI (SQLite under LEDIT_HOME) until Ctrl-C."""
    h = home_path(home)
    h.mkdir(parents=True, exist_ok=True)
    (h / "mlartifacts").mkdir(exist_ok=True)
    procs = []
    # Each server in its own process group, so that stopping it stops what it started too
    # (uvicorn workers, MLflow's job consumers); and on SIGTERM as on Ctrl-C. SIGINT is caught
    # too: started in the background by a script, it arrives ignored, and so would the servers.
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    previous_int = signal.signal(signal.SIGINT, raise_interrupt)
    try:
        for name, cmd, env in server_commands(h, host, prefect_port, mlflow_port):
            procs.append((name, subprocess.Popen(cmd, env=env, start_new_session=True)))
        click.echo(f"Prefect UI  http://{host}:{prefect_port}   (export PREFECT_API_URL=http://{host}:{prefect_port}/api)")
        click.echo(f"MLflow UI   http://{host}:{mlflow_port}   (export MLFLOW_TRACKING_URI=sqlite:///{h / 'mlflow.db'})")
        click.echo("GPU hosts: prefect work-pool create gpu --type process; "
                   "prefect work-pool set-concurrency-limit gpu 1; prefect worker start --pool gpu")
        while all(p.poll() is None for _, p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)    # a second SIGTERM must not cut the cleanup short
        stop_process_groups([p for _, p in procs])
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    failed = [(n, p.returncode) for n, p in procs if p.returncode not in (0, -signal.SIGINT, None)]
    if failed:
        fail(", ".join(f"{n} exited with {rc}" for n, rc in failed))


def raise_interrupt(signum, frame):
    """A signal handler that ends the process as Ctrl-C does, through ``finally`` blocks."""
    raise KeyboardInterrupt


def stop_process_groups(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGINT to each process's group (each was started with ``start_new_session``), then,
    for a group still alive after ``timeout`` seconds, SIGKILL."""
    for p in procs:
        _signal_group(p, signal.SIGINT)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while time.monotonic() < deadline and any(_group_alive(p.pid) for p in procs):
        time.sleep(0.2)                       # the leader is gone; its workers may still be ending
    for p in procs:
        if _group_alive(p.pid):
            _signal_group(p, signal.SIGKILL)
        if p.poll() is None:
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def add_commands(group: click.Group) -> None:
    group.add_command(server_cmd)

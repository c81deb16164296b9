"""Pipeline commands: ``run``, ``serve``, ``server``, ``rollback``, ``lineage``, ``pending``, ``demo``.

Every command takes ``--home`` (or ``$LEDIT_HOME``; default ``~/.ledit``). Without
``PREFECT_API_URL`` flows run on Prefect's ephemeral API, whose SQLite database is put under
LEDIT_HOME (``prefect.db``), the same one ``ledit server`` serves, so the runs show in its UI.
MLflow tracks to ``$MLFLOW_TRACKING_URI``, else ``sqlite:///$LEDIT_HOME/mlflow.db``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "samples" / "nightly-sample.jsonl"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _home_option(f):
    return click.option("--home", envvar="LEDIT_HOME", default=None, metavar="DIR",
                        help="LEDIT_HOME: data workspace, published adapter sets, state, mlflow.db "
                             "[env LEDIT_HOME; default ~/.ledit]")(f)


def _home(home) -> Path:
    from tasks.stream.workspace import resolve_home
    return resolve_home(home)


def prepare_env(home: Path) -> None:
    """Offline defaults, and the ephemeral Prefect API's database under LEDIT_HOME.

    Prefect reads its settings when first imported, so this changes nothing once it is (tests
    run inside ``prefect_test_harness``)."""
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)
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


def _fail(message: str, as_json: bool = False, code: int = 1):
    if as_json:
        click.echo(json.dumps({"status": "failed", "error": message}))
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _print_summary(s: dict) -> None:
    click.echo(f"status       {s['status']}")
    if s.get("version"):
        click.echo(f"candidate    {s['version']}  (registry version {s.get('model_version')}, "
                   f"MLflow run {s.get('mlflow_run_id')})")
    click.echo(f"production   {s.get('production_version') or 'none'}")
    p = s.get("production") or {}       # tasks.pipeline.core.production_status
    if p and not p.get("agree", True):
        click.echo(f"warning      pointer {p.get('pointer')}, MLflow alias {p.get('alias') or p.get('alias_error')}"
                   + ("; a switch is in flight: the next run finishes it" if p.get("promotion") else ""))
    click.echo(f"batches      {', '.join(s.get('batches') or []) or 'none new'}")
    c = s.get("changes")
    if c:
        click.echo(f"edits        {len(c['added'])} added, {len(c['superseded'])} superseded, "
                   f"{len(c['retracted'])} retracted, {len(s.get('skipped') or [])} skipped")
    from tasks.pipeline.gate import GATE_METRICS

    measured = {k: s.get(k) for k in GATE_METRICS if s.get(k) is not None}
    if measured:
        click.echo("gate         " + ", ".join(f"{k} {v:.3f}" for k, v in measured.items()))
    for metric, why in (s.get("not_measured") or {}).items():
        click.echo(f"not measured {metric}: {why}")
    for r in s.get("reasons") or []:
        click.echo(f"rejected     {r}")
    click.echo(f"pending      {s.get('pending', 0)} fact(s)")


# -- run ----------------------------------------------------------------------------------
@click.command("run")
@_home_option
@click.option("--facts", "fact_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Fact files to submit and edit now (repeatable). Without: the nightly refresh.")
@click.option("--json", "as_json", is_flag=True,
              help="End with one JSON line: status, version, mlflow_run_id, the gate metrics, ...")
@click.option("--dry-run", is_flag=True, help="Train and evaluate, never promote.")
@click.option("--force", is_flag=True,
              help="Run even with nothing new: the latest batch again, parked pending facts, "
                   "facts already live.")
def run_cmd(home, fact_files, as_json, dry_run, force):
    """Run the pipeline now: ingest, train, evaluate, gate, publish.

    Status is `promoted`, `rejected` (production unchanged; the facts stay pending with their
    reasons; see `ledit pending`) or `nothing-to-do`. Exit status 0 for all three.
    """
    h = _home(home)
    prepare_env(h)
    from flows.nightly import manual_edit, nightly_refresh

    try:
        start_prefect_api(h)
        if fact_files or dry_run or force:
            summary = manual_edit(facts=[str(Path(f).resolve()) for f in fact_files] or None,
                                  dry_run=dry_run, force=force, home=str(h))
        else:
            summary = nightly_refresh(home=str(h))
    except Exception as exc:
        _fail("\n".join([f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", ())]), as_json)
    if as_json:
        sys.stderr.flush()
        click.echo(json.dumps(summary, sort_keys=True, default=str))
    else:
        _print_summary(summary)


# -- serve / server ---------------------------------------------------------------------------
@click.command("serve")
@_home_option
@click.option("--cron", default=None, help='Nightly schedule (default: params.yaml pipeline.schedule, "0 2 * * *").')
@click.option("--timezone", "tz", default=None, help="Time zone of the schedule (default: params.yaml, UTC).")
def serve_cmd(home, cron, tz):
    """Serve the nightly deployment on its cron schedule, plus manual-edit and rollback
    deployments (`prefect deployment run 'manual-edit/manual'` triggers one).

    Schedules need a Prefect server: start `ledit server` and export
    PREFECT_API_URL=http://127.0.0.1:4200/api first.
    """
    if not os.environ.get("PREFECT_API_URL"):
        _fail("ledit serve needs a Prefect server (the ephemeral API runs no scheduler): start "
              "`ledit server`, then export PREFECT_API_URL=http://127.0.0.1:4200/api")
    h = _home(home)
    prepare_env(h)
    from prefect import serve
    from prefect.schedules import Cron

    from editing import load_params
    from flows.nightly import manual_edit, nightly_refresh, rollback

    cfg = load_params().get("pipeline", {})
    cron = cron or cfg.get("schedule", "0 2 * * *")
    tz = tz or cfg.get("timezone", "UTC")
    common = {"parameters": {"home": str(h)}, "concurrency_limit": 1, "tags": ["ledit"]}
    click.echo(f"serving nightly-refresh/nightly on '{cron}' ({tz}), manual-edit/manual, rollback/rollback")
    serve(nightly_refresh.to_deployment(name="nightly", schedule=Cron(cron, timezone=tz), **common),
          manual_edit.to_deployment(name="manual", **common),
          rollback.to_deployment(name="rollback", **common))


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def server_commands(home: Path, host: str = "127.0.0.1", prefect_port: int = 4200,
                    mlflow_port: int = 5000) -> list[tuple[str, list[str], dict]]:
    """The Prefect server and the MLflow UI, both on ``host`` with SQLite under ``home``."""
    env = {**os.environ, **OFFLINE,
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
           "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port)}
    env.pop("PREFECT_API_URL", None)
    prefect = [_tool("prefect"), "server", "start", "--host", host, "--port", str(prefect_port)]
    mlflow = [_tool("mlflow"), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
              "--default-artifact-root", str(home / "mlartifacts"), "--host", host,
              "--port", str(mlflow_port)]
    return [("prefect", prefect, env), ("mlflow", mlflow, {**os.environ, **OFFLINE})]


@click.command("server")
@_home_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (anything else exposes the UIs beyond this machine).")
@click.option("--prefect-port", default=4200, show_default=True)
@click.option("--mlflow-port", default=5000, show_default=True)
def server_cmd(home, host, prefect_port, mlflow_port):
    """Start the Prefect server and the MLflow UI (SQLite under LEDIT_HOME) until Ctrl-C."""
    h = _home(home)
    h.mkdir(parents=True, exist_ok=True)
    (h / "mlartifacts").mkdir(exist_ok=True)
    procs = []
    # Each server in its own process group, so that stopping it stops what it started too
    # (uvicorn workers, MLflow's job consumers); and on SIGTERM as on Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
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
    failed = [(n, p.returncode) for n, p in procs if p.returncode not in (0, -signal.SIGINT, None)]
    if failed:
        _fail(", ".join(f"{n} exited with {rc}" for n, rc in failed))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_process_groups(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGINT to each process's group (each was started with ``start_new_session``), then,
    for a group still alive after ``timeout`` seconds, SIGKILL."""
    def signal_group(p, sig):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    for p in procs:
        signal_group(p, signal.SIGINT)
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
            signal_group(p, signal.SIGKILL)
        if p.poll() is None:
            p.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# -- rollback / lineage / pending --------------------------------------------------------------
@click.command("rollback")
@_home_option
@click.argument("version")
@click.option("--json", "as_json", is_flag=True)
def rollback_cmd(home, version, as_json):
    """Move production (published pointer and MLflow alias `production`) back to VERSION."""
    h = _home(home)
    prepare_env(h)
    from flows.nightly import rollback

    try:
        out = rollback(version, home=str(h))
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", as_json)
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
    else:
        click.echo(f"production {out['previous']} -> {out['version']} (registry version {out.get('model_version')})")


@click.command("lineage")
@_home_option
@click.argument("fact_id")
@click.option("--json", "as_json", is_flag=True)
def lineage_cmd(home, fact_id, as_json):
    """Trace FACT_ID: source file and line, ingest batch (git tag, DVC md5), MLflow run,
    adapter version and gate metrics, and its status now."""
    from tasks.pipeline.lineage import lineage, markdown

    info = lineage(_home(home), fact_id)
    if as_json:
        click.echo(json.dumps(info, sort_keys=True, default=str))
    else:
        click.echo(markdown(info))
    if info["status"] == "unknown":
        sys.exit(1)


@click.command("pending")
@_home_option
@click.option("--json", "as_json", is_flag=True)
def pending_cmd(home, as_json):
    """Facts waiting for the next run, each with the reason it was not promoted."""
    from tasks.pipeline.core import pending_facts

    rows = pending_facts(_home(home))
    if as_json:
        click.echo(json.dumps(rows, sort_keys=True))
        return
    for r in rows:
        click.echo(f"{r['fact_id']}  {r['subject']!r} -> {r['target_new']!r}  "
                   f"[{r['attempts']} attempt(s){', parked' if r['parked'] else ''}] {r['reason']}")
    if not rows:
        click.echo("no pending facts")


# -- demo ----------------------------------------------------------------------------------------
@click.command("demo")
@_home_option
@click.option("--facts", "facts_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Default: data/samples/nightly-sample.jsonl (8 CounterFact edits).")
def demo_cmd(home, facts_path):
    """Run the whole nightly flow once on a bundled sample stream: ephemeral Prefect API, SQLite
    MLflow, a local DVC remote, the embedded SmolLM2. Prints the summary and how to open both UIs."""
    h = _home(home)
    prepare_env(h)
    from editing import Fact, load_params
    from editing.metrics import greedy
    from flows.nightly import nightly_refresh
    from tasks.pipeline import store as pub
    from tasks.pipeline.core import model_for
    from tasks.stream.sources import submit
    from tasks.stream.workspace import Home, init_workspace

    params = load_params()
    click.echo(f"LEDIT_HOME {h}")
    init_workspace(h)
    submit([facts_path or str(SAMPLE)], h)
    click.echo(f"submitted {facts_path or SAMPLE.relative_to(ROOT)}; running the nightly flow "
               f"(model {params['model']['name']}, edit method {params['edit']['method']})...")
    start_prefect_api(h)
    summary = nightly_refresh(home=str(h), params=params)
    click.echo("")
    _print_summary(summary)
    hh = Home(h)
    version = pub.production_version(hh)
    if version:
        record = pub.read_record(hh, version)
        facts = [Fact(**x["fact"]) for x in record["live_after"]][:8]
        model, tokenizer = model_for(params)
        handle = pub.load_published(hh, version).attach(model)
        try:
            answers = greedy(model, tokenizer, [f.prompt for f in facts], 4)
        finally:
            handle.remove()
        click.echo(f"\nproduction {version} answers:")
        for f, a in zip(facts, answers):
            click.echo(f"  {f.prompt} -> {tokenizer.decode(a, skip_special_tokens=True).strip()!r}"
                       f"  (wanted {f.target_new!r})")
    click.echo(f"""
Open the UIs:
  ledit server --home {h}
  Prefect  http://127.0.0.1:4200   (flow runs, the run summary, the edits table, the gate)
  MLflow   http://127.0.0.1:5000   (experiment 'ledit', model 'baft-adapter-set' @production)
Trace a fact:  ledit lineage --home {h} <fact_id>     Roll back:  ledit rollback --home {h} v1""")


COMMANDS = (run_cmd, serve_cmd, server_cmd, rollback_cmd, lineage_cmd, pending_cmd, demo_cmd)


def add_commands(group: click.Group) -> None:
    for command in COMMANDS:
        group.add_command(command)

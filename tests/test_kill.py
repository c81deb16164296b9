"""A real ``kill -9`` at every stage: ``ledit ingest`` and ``ledit run`` in a subprocess that
SIGKILLs itself at a fault point (``LEDIT_INJECT_FAULT=point:kill``), then the next run.

After each kill: production is untouched when the kill came before the switch, or the
promotion record names the switch in flight; the next run completes; nothing accepted is
lost and no edit, batch or tag is doubled; the pointer and the MLflow alias agree.

To stay fast every test starts from a copy of one prepared home (git + DVC initialised; for
the pipeline, v1 promoted and a second fact ingested). MLFLOW_TRACKING_URI is unset here, so each home keeps its
own ``mlflow.db``, copied with it; the copies' new runs still store artifacts under the
template's ``mlartifacts`` (an experiment's artifact location is absolute), kept apart by run id.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_pipeline as tp  # noqa: E402  (tests is not a package)

ROOT = tp.ROOT
fact, feed, fact_ids = tp.fact, tp.feed, tp.fact_ids


# -- fixtures and helpers -----------------------------------------------------------------
@pytest.fixture(scope="module")
def params(tiny_dir):
    return tp.make_params(tiny_dir, "kill")


@pytest.fixture(scope="module")
def v1_template(mlflow_in_home, params, tmp_path_factory) -> Path:
    """A home where fact(1) is promoted as v1 and fact(2) is accepted, in a batch no run has
    processed yet (ingested here once, rather than by every killed run)."""
    from flows.nightly import nightly_refresh
    from tasks.stream.ingest import ingest
    from tasks.stream.workspace import init_workspace

    root = tmp_path_factory.mktemp("kill-v1") / "home"
    h = init_workspace(root)
    feed(h, root.parent, "day1.jsonl", [fact(1)])
    assert nightly_refresh(home=str(root), params=params)["version"] == "v1"
    feed(h, root.parent, "day2.jsonl", [fact(2)])
    assert ingest(h).accepted == 1
    return root


@pytest.fixture(scope="module")
def empty_template(tmp_path_factory) -> Path:
    from tasks.stream.workspace import init_workspace

    root = tmp_path_factory.mktemp("kill-empty") / "home"
    init_workspace(root)
    return root


def copy_home(template: Path, dest: Path):
    """A copy of a prepared home; config and DVC remote are pointed at the copy."""
    from tasks.stream.workspace import init_workspace

    top = {"config.json", ".lock", ".pipeline.lock"}     # locks and paths of the template
    shutil.copytree(template, dest, symlinks=True,
                    ignore=lambda d, names: [n for n in names if Path(d) == template and n in top])
    return init_workspace(dest)


def ledit(h, *args, fault: str | None = None, params_file: Path | None = None):
    """``python -m flows.cli ARGS --home H`` as its own process."""
    from prefect.settings import PREFECT_API_URL

    from tasks.faults import FAULT_ENV

    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["PYTHONPATH"] = str(ROOT)
    if PREFECT_API_URL.value():     # the test API, where a test runs inside it
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    if fault:
        env[FAULT_ENV] = fault
    if params_file:
        env["LEDIT_PARAMS"] = str(params_file)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--home", str(h.root)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


def assert_killed(proc):
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


# -- ingest -------------------------------------------------------------------------------
INGEST_KILLS = {   # fault point: the journal phase it leaves behind, and whether the tag exists
    "after_parquet_write": ("staged", False), "after_dvc_add": ("written", False),
    "after_commit": ("added", True), "after_push": ("recorded", True),
}


@pytest.mark.parametrize("point", list(INGEST_KILLS))
def test_an_ingest_killed_at_each_step_is_finished_by_the_next(empty_template, tmp_path, point):
    import polars as pl

    from tasks.stream import ledger, version
    from tasks.stream.ingest import ingest, read_journal

    h = copy_home(empty_template, tmp_path / "home")
    accepted = [fact(i) for i in range(4)]
    feed(h, tmp_path, "a.jsonl", accepted + [fact(0), {"subject": "no prompt"}])
    assert_killed(ledit(h, "ingest", "--json", fault=f"{point}:kill"))
    j = read_journal(h)
    phase, tagged = INGEST_KILLS[point]
    assert j["phase"] == phase and j["accepted"] == 4
    assert version.tags(h.workspace) == ([j["batch"]] if tagged else [])

    feed(h, tmp_path, "b.jsonl", [fact(5)])          # new work waits behind the recovery
    r = ingest(h)
    assert r.recovered == [j["run_id"]] and r.batches[0] == j["batch"] and len(r.batches) == 2
    assert read_journal(h) is None
    tags = version.tags(h.workspace)
    assert tags == r.batches                                           # no duplicate tag
    for tag, want in zip(tags, (accepted, [fact(5)])):
        df = pl.read_parquet(h.workspace / f"batches/{tag}.parquet")
        assert sorted(df["fact_id"]) == fact_ids(want)                 # the batch holds them all
        commits = version.git(h.workspace, "log", "--format=%s").stdout.splitlines()
        assert sum(c.startswith(f"{tag}:") for c in commits) == 1      # one commit per batch
    assert sorted(ledger.latest_facts(h)["fact_id"]) == fact_ids(accepted + [fact(5)])
    assert version.git(h.workspace, "status", "--porcelain").stdout.strip() == ""
    for tag in tags:                                                   # every batch pushed
        md5 = json.loads((h.workspace / f"batches/{tag}.json").read_text())["dvc_md5"]
        assert (h.default_remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    report = json.loads((h.run_dir(j["run_id"]) / "report.json").read_text())
    assert report["phase"] == "done" and report["batch"] == j["batch"]


# -- the pipeline -------------------------------------------------------------------------
BEFORE_SWITCH = ("during_evaluation", "after_mlflow_log", "after_register")


def live_ids(h, version):
    from tasks.pipeline import store as pub
    return sorted(pub.load_published(h, version).fact_ids)


def applied_ids(h, op="upsert"):
    from tasks.stream import ledger
    applied = ledger.applied_edits(h)
    return sorted(applied.filter(applied["op"] == op)["fact_id"])


@pytest.mark.parametrize("point", [*BEFORE_SWITCH, "after_pointer"])
def test_a_run_killed_at_each_stage_loses_nothing_and_applies_nothing_twice(
        v1_template, params, tmp_path, point):
    import yaml

    from flows.nightly import nightly_refresh
    from tasks.pipeline import store as pub
    from tasks.pipeline import tracking
    from tasks.stream import version
    from tasks.pipeline.report import production_status
    from tasks.pipeline.state import read_state
    from tasks.settings import as_settings

    h = copy_home(v1_template, tmp_path / "home")
    settings = as_settings(params)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params), encoding="utf-8")
    v1_weights = h.root / "published" / "v1" / "adapter.safetensors"
    v1_bytes = v1_weights.read_bytes()
    both = fact_ids([fact(1), fact(2)])

    assert_killed(ledit(h, "run", "--json", fault=f"{point}:kill", params_file=params_file))
    st = production_status(h, settings)
    if point in BEFORE_SWITCH:       # production untouched: both stores still name v1
        assert (st["pointer"], st["alias"], st["promotion"]) == ("v1", "v1", None)
    else:                            # the pointer moved, the alias not: the record names it
        assert (st["pointer"], st["alias"], st["agree"]) == ("v2", "v1", False)
        p = st["promotion"]
        assert (p["kind"], p["version"], p["previous"]) == ("promote", "v2", "v1")
        assert p["model_version"] == pub.read_record(h, "v2")["model_version"]
    assert v1_weights.read_bytes() == v1_bytes

    s = nightly_refresh(home=str(h.root), params=params)      # settles first, then the new work
    want = "v2" if point == "after_pointer" else "v3"         # v2 redone as v3 unless promoted
    assert s["production_version"] == want
    assert s["status"] == ("nothing-to-do" if want == "v2" else "promoted")
    st = production_status(h, settings)
    assert (st["pointer"], st["alias"], st["promotion"], st["agree"]) == (want, want, None, True)
    assert s["production"] == st
    assert live_ids(h, want) == both                # each fed fact live, once
    assert applied_ids(h) == both                   # and applied once
    state = read_state(h)                           # both batches done, once; nothing left over
    assert state["processed_batches"] == version.tags(h.workspace) and len(state["processed_batches"]) == 2
    assert state["pending"] == {}
    v2 = pub.read_record(h, "v2")
    assert v2["status"] == ("promoted" if want == "v2" else "abandoned")
    run = tracking.client(h).get_run(v2["mlflow_run_id"])
    assert run.info.status == ("FINISHED" if want == "v2" else "KILLED")
    if point == "after_register":    # registered as passed, then killed: the registry says so
        mv = tracking.client(h).get_model_version(tracking.registered_model_name(settings), v2["model_version"])
        assert mv.tags["gate"] == "abandoned"
    assert v1_weights.read_bytes() == v1_bytes

    if point == "after_pointer":     # a rollback uses the same journaled switch
        assert_killed(ledit(h, "rollback", "v1", "--json", fault="after_pointer:kill",
                            params_file=params_file))
        st = production_status(h, settings)
        assert (st["pointer"], st["alias"]) == ("v1", "v2")
        assert (st["promotion"]["kind"], st["promotion"]["version"]) == ("rollback", "v1")
        s = nightly_refresh(home=str(h.root), params=params)
        assert (s["status"], s["production_version"]) == ("nothing-to-do", "v1")
        st = production_status(h, settings)
        assert (st["pointer"], st["alias"], st["promotion"]) == ("v1", "v1", None)
        assert applied_ids(h) == fact_ids([fact(1)]) and applied_ids(h, "retract") == fact_ids([fact(2)])


_START_THEN_DIE = """
import os, signal, sys
from pathlib import Path
from flows.cli.prefect_api import prepare_env, start_prefect_api
home = Path(sys.argv[1])
prepare_env(home)
start_prefect_api(home)
from prefect.server.api.server import SubprocessASGIServer
(server,) = [s for s in SubprocessASGIServer._instances.values() if s.server_process]
print(server.server_process.pid, server.port, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_run_leaves_no_ephemeral_prefect_server_behind(tmp_path):
    """`ledit run` starts Prefect's ephemeral server as a child; killed outright, the run
    must not leave it orphaned, holding a port and prefect.db (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import socket
    import subprocess
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", _START_THEN_DIE, str(tmp_path / "home")], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          timeout=120)    # an orphan holding the pipe would hang here
    assert proc.returncode == -signal.SIGKILL
    pid, port = (int(x) for x in proc.stdout.split())

    def gone() -> bool:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        return "\nState:\tZ" in state          # exited; only its parent's reaping is left

    deadline = time.monotonic() + 30
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gone(), f"the ephemeral Prefect server {pid} outlived the killed run"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0

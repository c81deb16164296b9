"""Unavailable infrastructure: a locked or unreachable MLflow store, an unreachable DVC remote,
a full disk. Each fails the run with an error that names what is unavailable and where;
production (the ``published/production`` pointer and the MLflow alias) is untouched; the
facts stay pending; and the next run, the fault gone, promotes them, each live exactly once.

To stay fast every test starts from a copy of one home where fact(1) is promoted as v1. MLflow
is each home's own ``sqlite:///HOME/mlflow.db`` (MLFLOW_TRACKING_URI unset), copied with it,
so a copy's registry alias ``production`` is its own.
"""
from __future__ import annotations

import errno
import json
import shutil
import socket
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_pipeline as tp  # noqa: E402  (tests is not a package)
from tasks.settings import as_settings  # noqa: E402

fact, feed, fact_ids = tp.fact, tp.feed, tp.fact_ids


# -- fixtures and helpers -----------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_retry_delays(monkeypatch):
    """The tasks these faults fail still retry, without their seconds of sleep."""
    from tasks.pipeline import tasks as t

    for name in ("ingest_facts", "start_tracking"):
        monkeypatch.setattr(t, name, getattr(t, name).with_options(retry_delay_seconds=0))


@pytest.fixture(scope="module")
def params(tiny_dir):
    # a lock is given up after 1 s here (default 10 s); the task's retries still apply
    return tp.make_params(tiny_dir, "infra", tracking_timeout_s=1)


@pytest.fixture(scope="module")
def v1_home(mlflow_in_home, params, tmp_path_factory) -> Path:
    from flows.nightly import nightly_refresh
    from tasks.stream.workspace import init_workspace

    root = tmp_path_factory.mktemp("infra-v1") / "home"
    feed(init_workspace(root), root.parent, "day1.jsonl", [fact(1)])
    s = nightly_refresh(home=str(root), params=params)
    assert (s["status"], s["version"], s["model_version"]) == ("promoted", "v1", "1")
    return root


@pytest.fixture()
def h(v1_home, tmp_path):
    """A private copy of the v1 home, its config and DVC remote pointed at the copy."""
    from tasks.stream.workspace import init_workspace

    dest = tmp_path / "home"
    skip = {"config.json", ".lock", ".pipeline.lock"}
    shutil.copytree(v1_home, dest, symlinks=True,
                    ignore=lambda d, names: [n for n in names if Path(d) == v1_home and n in skip])
    return init_workspace(dest)


def run(h, params):
    from flows.nightly import nightly_refresh
    return nightly_refresh(home=str(h.root), params=params)


def assert_production_is_v1(h, params):
    from tasks.pipeline import store as pub
    from tasks.pipeline import tracking

    assert pub.production_version(h) == "v1"
    assert tracking.production_alias(h, as_settings(params)) == "1"
    assert pub.load_production(h)[1].fact_ids == fact_ids([fact(1)])


def assert_waiting_for_training(h, failed_version: str, error: str):
    """fact(2) sits in an unprocessed batch; the failed candidate is abandoned, saying why."""
    from tasks.pipeline import steps
    from tasks.pipeline import store as pub

    (batch,) = steps.unprocessed_batches(h)
    items = steps.batch_edits(h, batch["tag"], batch["dvc_md5"])
    assert [i["fact"]["fact_id"] for i in items] == fact_ids([fact(2)])
    record = pub.read_record(h, failed_version)
    assert record["status"] == "abandoned" and error in record["abandoned_reason"]
    assert not pub.candidate_dir(h, failed_version).exists()      # nothing was trained or saved
    return batch["tag"]


def assert_next_run_promotes_each_fact_once(h, params, batch: str | None = None):
    from tasks.stream import ledger
    from tasks.pipeline import steps
    from tasks.pipeline import store as pub
    from tasks.pipeline import tracking
    from tasks.stream.ingest import read_journal

    s = run(h, params)
    assert s["status"] == "promoted", s
    if batch:
        assert s["batches"] == [batch]
    both = fact_ids([fact(1), fact(2)])
    assert pub.production_version(h) == s["version"]
    assert tracking.production_alias(h, as_settings(params)) == s["model_version"]
    assert sorted(pub.load_production(h)[1].fact_ids) == both           # live, once each
    assert sorted(ledger.applied_edits(h)["fact_id"].to_list()) == both  # applied, once each
    assert steps.unprocessed_batches(h) == [] and steps.read_state(h)["pending"] == {}
    assert read_journal(h) is None
    return s


# -- MLflow --------------------------------------------------------------------------------
def test_a_locked_mlflow_database_fails_the_run_before_training(h, params, tmp_path):
    from tasks.pipeline.tracking import TrackingUnavailable

    feed(h, tmp_path, "day2.jsonl", [fact(2)])
    db = h.root / "mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None)     # another process's exclusive lock
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(TrackingUnavailable) as failed:
            run(h, params)
    finally:
        holder.rollback()
        holder.close()
    message = str(failed.value)
    assert f"MLflow tracking store sqlite:///{db} is unavailable" in message
    assert "locked by another process" in message and "within 1 s" in message
    (note,) = failed.value.__notes__        # what the user reads under the error
    assert "production unchanged (v1)" in note and "the facts stay pending for the next run" in note

    assert_waiting_for_training(h, "v2", "locked by another process")
    assert_production_is_v1(h, params)
    assert_next_run_promotes_each_fact_once(h, params)


def test_an_unreachable_mlflow_store_fails_the_run_before_training(h, params, tmp_path, monkeypatch):
    from tasks.pipeline.tracking import TrackingUnavailable

    feed(h, tmp_path, "day2.jsonl", [fact(2)])
    unmounted = tmp_path / "unmounted"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{unmounted}/mlflow.db")
    with pytest.raises(TrackingUnavailable) as failed:
        run(h, params)
    assert f"directory {unmounted} does not exist" in str(failed.value)
    assert "(MLFLOW_TRACKING_URI)" in str(failed.value)
    assert not unmounted.exists()                     # no empty store made in its place

    with socket.socket() as s:                        # a port no server listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(TrackingUnavailable) as failed:
        run(h, params)
    assert f"cannot connect to http://127.0.0.1:{port}: " in str(failed.value)
    assert "Connection refused" in str(failed.value)

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert_waiting_for_training(h, "v3", "TrackingUnavailable")
    assert_production_is_v1(h, params)
    assert_next_run_promotes_each_fact_once(h, params)


def test_mlflow_calls_name_an_outage_and_pass_other_errors_through(h, params, monkeypatch):
    """Past the run's first check, every call through ``tracking`` still says what is down; an
    outage is never read as an answer (no alias), and MLflow's own errors are left as they are."""
    from mlflow.exceptions import MlflowException

    from tasks.pipeline import tracking

    with pytest.raises(MlflowException) as missing:             # the store is up: a real answer
        tracking.client(h).get_run("0" * 32)
    assert not isinstance(missing.value, tracking.TrackingUnavailable)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(tracking.TrackingUnavailable, match="no answer from the server: .*Connection refused"):
        tracking.client(h).get_run("0" * 32)
    with pytest.raises(tracking.TrackingUnavailable):
        tracking.production_alias(h, as_settings(params))                    # not None: the alias is unknown


# -- DVC -------------------------------------------------------------------------------------
def test_an_unreachable_dvc_remote_keeps_the_batch_committed_for_the_next_run(h, params, tmp_path):
    from tasks.pipeline import steps
    from tasks.pipeline import store as pub
    from tasks.stream import version
    from tasks.stream.ingest import read_journal
    from tasks.stream.version import RemoteUnavailable
    from tasks.stream.workspace import init_workspace

    remote = Path(h.config()["remote"])
    blocker = tmp_path / "nas"
    blocker.write_text("a regular file where the remote's directory should be\n")
    init_workspace(h.root, remote=str(blocker / "remote"))
    tags_before = version.tags(h.workspace)
    feed(h, tmp_path, "day2.jsonl", [fact(2)])

    with pytest.raises(RemoteUnavailable) as failed:
        run(h, params)
    message = str(failed.value)
    assert f"dvc push to the DVC remote 'storage' ({blocker / 'remote'}) failed" in message
    assert "Not a directory" in message and "the next ingest retries the push" in message

    j = read_journal(h)                               # committed and tagged, not yet pushed
    assert (j["phase"], j["accepted"]) == ("recorded", 1)
    assert version.tags(h.workspace) == tags_before + [j["batch"]]
    assert [b["tag"] for b in steps.unprocessed_batches(h)] == [j["batch"]]
    assert [r["version"] for r in pub.list_records(h)] == ["v1"]     # no candidate planned
    assert_production_is_v1(h, params)

    init_workspace(h.root, remote=str(remote))        # the remote is back
    assert_next_run_promotes_each_fact_once(h, params, batch=j["batch"])
    assert version.tags(h.workspace) == tags_before + [j["batch"]]   # no second batch
    md5 = version.dvc_md5(h.workspace, f"batches/{j['batch']}.parquet")
    assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()    # pushed


# -- a full disk ---------------------------------------------------------------------------
def test_a_full_disk_at_the_batch_write_or_the_adapter_write_loses_nothing(h, params, tmp_path, monkeypatch):
    import polars as pl

    from tasks.pipeline import store as pub
    from tasks.stream import version
    from tasks.faults import FAULT_ENV
    from tasks.stream.ingest import read_journal

    tags_before = version.tags(h.workspace)
    feed(h, tmp_path, "day2.jsonl", [fact(2)])

    monkeypatch.setenv(FAULT_ENV, "write_batch:enospc")
    with pytest.raises(OSError) as failed:
        run(h, params)
    assert failed.value.errno == errno.ENOSPC
    assert "No space left on device" in str(failed.value) and "write_batch" in str(failed.value)
    j = read_journal(h)                               # validated and staged, kept for the next try
    assert (j["phase"], j["accepted"]) == ("staged", 1)
    assert pl.read_parquet(j["staged_batch"])["fact_id"].to_list() == fact_ids([fact(2)])
    assert sorted(p.name for p in h.batches.iterdir() if j["batch"] in p.name) == []
    assert version.tags(h.workspace) == tags_before
    assert [r["version"] for r in pub.list_records(h)] == ["v1"]
    assert_production_is_v1(h, params)

    monkeypatch.setenv(FAULT_ENV, "write_adapter:enospc")   # the batch goes in; the save fails
    with pytest.raises(OSError) as failed:
        run(h, params)
    assert failed.value.errno == errno.ENOSPC and "write_adapter" in str(failed.value)
    (note,) = failed.value.__notes__
    assert "production unchanged (v1)" in note and "1 unprocessed batch(es)" in note and "Disk full" in note
    assert read_journal(h) is None
    batch = assert_waiting_for_training(h, "v2", "No space left on device")
    assert [p.name for p in pub.candidate_dir(h, "v2").parent.glob(".v2*")] == []   # no staging left
    assert_production_is_v1(h, params)

    monkeypatch.delenv(FAULT_ENV)
    assert_next_run_promotes_each_fact_once(h, params, batch=batch)


def test_an_adapter_save_on_a_full_disk_leaves_the_old_set_and_no_temp_files(tmp_path, monkeypatch):
    """The real failure inside ``AdapterSet.save``: safetensors raises its own error type after
    writing part of the file; the save says disk full and where, and cleans up."""
    import torch

    from editing import adapters
    from editing.adapters import AdapterSet, Block

    def adapter_set(rows: int) -> AdapterSet:
        lora = {2: {"A": torch.ones(rows, 4), "B": torch.ones(4, rows), "scale": 1.0}}
        return AdapterSet("tiny", "sha256:x", "lora", [Block(fact_ids=["f1"], lora=lora,
                                                              owner=torch.tensor([0]))])

    target = tmp_path / "sets" / "v1"
    adapter_set(2).save(target)
    real_save_file = adapters.save_file

    def disk_fills_up(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1024)          # part of the file, then the disk is full
        raise type("SafetensorError", (Exception,), {})(
            "Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(adapters, "save_file", disk_fills_up)
    with pytest.raises(OSError) as failed:
        adapter_set(8).save(target)
    assert failed.value.errno == errno.ENOSPC
    assert f"No space left on device writing the adapter set {target}" in str(failed.value)
    assert sorted(p.name for p in target.parent.iterdir()) == ["v1"]    # no staging directory
    kept = AdapterSet.load(target)                                       # the old set, whole
    assert kept.blocks[0].lora[2]["A"].shape == (2, 4)

    monkeypatch.setattr(adapters, "save_file", real_save_file)
    adapter_set(8).save(target)
    assert AdapterSet.load(target).blocks[0].lora[2]["A"].shape == (8, 4)
    assert sorted(p.name for p in target.parent.iterdir()) == ["v1"]


def test_a_real_full_disk_in_the_batch_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import polars as pl

    from tasks.stream.ingest import ingest, read_journal
    from tasks.stream.sources import submit
    from tasks.stream.workspace import init_workspace

    h = init_workspace(tmp_path / "home")
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"subject": "P", "prompt": "P works in", "target_new": "T"}) + "\n")
    submit([src], h)
    real = pl.LazyFrame.sink_parquet

    def full(self, path, *a, **k):
        if not str(path).endswith(".parquet.tmp"):       # only the batch write
            return real(self, path, *a, **k)
        Path(path).write_bytes(b"PAR1" + b"\0" * 4096)
        raise pl.exceptions.ComputeError(
            "parquet: File out of specification: underlying IO error: No space left on device (os error 28)")

    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", full)
    with pytest.raises(OSError) as failed:
        ingest(h)
    assert failed.value.errno == errno.ENOSPC and "writing batch" in str(failed.value)
    assert [p.name for p in h.batches.iterdir() if p.name.endswith(".tmp")] == []
    assert read_journal(h)["phase"] == "staged"
    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", real)
    assert ingest(h).accepted == 1 and read_journal(h) is None

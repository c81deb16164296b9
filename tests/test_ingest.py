"""The fact-update stream end to end, against real git + DVC workspaces in tmp_path:
quarantine, deduplication, re-ingestion, applied edits, crashes, concurrent ingests, CLI."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from flows.cli.ingest import data_main
from tasks.stream import ledger, version
from tasks.stream.ingest import FAULT_ENV, InjectedFault, ingest, read_journal
from tasks.stream.sources import list_inbox, submit
from tasks.stream.workspace import Home, init_workspace

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
TAG = r"^batch-\d{8}-\d{6}(-\d+)?$"


# -- fixtures and helpers -----------------------------------------------------------
@pytest.fixture(scope="session")
def home_template(tmp_path_factory):
    """One initialised home (git init + dvc init are the slow part), copied per test."""
    root = tmp_path_factory.mktemp("template") / "home"
    init_workspace(root)
    return root


@pytest.fixture
def home(tmp_path, home_template) -> Home:
    dest = tmp_path / "home"
    shutil.copytree(home_template, dest, symlinks=True,
                    ignore=shutil.ignore_patterns("config.json", ".lock"))
    return init_workspace(dest)       # points config, DVC remote and inbox at the copy


def fact(i, **kw):
    rec = {"subject": f"Subject {i}", "prompt": f"The employer of Subject {i} is",
           "target_new": f"Company {i}", "target_old": f"Old {i}", "relation": "employer"}
    rec.update(kw)
    return rec


def put(h: Home, name: str, content, tmp: Path | None = None, inbox: str | None = None) -> str:
    """Submit a file (records as JSONL, or raw bytes) through the real ``submit``."""
    src = (tmp or h.root.parent) / "src" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        src.write_bytes(content)
    else:
        src.write_text("".join(json.dumps(r) + "\n" for r in content), encoding="utf-8")
    return submit([src], h, inbox=inbox)[0]


def batch_frame(h: Home, tag: str) -> pl.DataFrame:
    return pl.read_parquet(h.workspace / f"batches/{tag}.parquet")


def assert_consistent(h: Home, dvc_status: bool = False):
    """No run pending, git clean, one .dvc + manifest per tag, ledgers without doubles."""
    assert read_journal(h) is None
    assert version.git(h.workspace, "status", "--porcelain").stdout.strip() == ""
    version.git(h.workspace, "fsck", "--no-progress")
    for tag in version.tags(h.workspace):
        tree = version.git(h.workspace, "ls-tree", "--name-only", tag, "batches/").stdout.split()
        assert f"batches/{tag}.parquet.dvc" in tree and f"batches/{tag}.json" in tree
    facts = ledger.latest_facts(h)
    assert facts["fact_id"].n_unique() == facts.height
    if dvc_status:
        out = version.dvc(h.workspace, "status", "--cloud").stdout
        assert "in sync" in out or out.strip() == "", out


def balanced(r):
    assert r.records_in == r.accepted + r.duplicates + r.quarantined


# -- formats, versioning ------------------------------------------------------------
def test_formats_versioned_with_git_and_dvc(home, tmp_path):
    for p in ("counterfact-sample.json", "zsre-sample.json", "demo-facts.jsonl"):
        submit([SAMPLES / p], home)
    csv = tmp_path / "more.csv"
    csv.write_text("subject,prompt,target_new\nAda Lovelace,Ada Lovelace worked on,the loom\n",
                   encoding="utf-8")
    pq = tmp_path / "more.parquet"
    pl.DataFrame([fact(1), fact(2)]).write_parquet(pq)
    submit([csv, pq], home)

    r = ingest(home)
    balanced(r)
    cf = len(json.loads((SAMPLES / "counterfact-sample.json").read_text()))
    zs = len(json.loads((SAMPLES / "zsre-sample.json").read_text()))
    assert r.records_in == cf + zs + 4 + 1 + 2 and r.files == 5
    assert r.quarantined >= 1 and r.accepted > 0
    assert r.batch and re.match(TAG, r.batch) and r.batches == [r.batch]
    # DVC: the .dvc file's md5 is the result's and the file's; the tag holds it; pushed
    dvcfile = home.workspace / f"batches/{r.batch}.parquet.dvc"
    assert version.dvc_md5(home.workspace, f"batches/{r.batch}.parquet") == r.dvc_md5
    data = (home.workspace / f"batches/{r.batch}.parquet").read_bytes()
    assert hashlib.md5(data).hexdigest() == r.dvc_md5
    assert (home.default_remote / "files" / "md5" / r.dvc_md5[:2] / r.dvc_md5[2:]).exists()
    assert version.tag_exists(home.workspace, r.batch) and dvcfile.exists()
    manifest = json.loads((home.workspace / f"batches/{r.batch}.json").read_text())
    assert manifest["accepted"] == r.accepted and manifest["dvc_md5"] == r.dvc_md5
    assert sum(f["records"] for f in manifest["files"]) == r.records_in
    df = batch_frame(home, r.batch)
    assert df.height == r.accepted and set(df["batch"]) == {r.batch}
    assert {"counterfact", "zsre", "ledit"} <= set(df["source_format"])
    # quarantine: file, line and reason; nothing in the inbox; originals archived
    rejects = [json.loads(x) for x in Path(r.quarantine[0]).read_text().splitlines()]
    assert len(rejects) == r.quarantined
    assert all(x["file"] and x["line"] and x["reason"] for x in rejects)
    assert list_inbox(home.inbox_url) == []
    assert len(ledger.ingested_files(home)) == 5
    assert_consistent(home, dvc_status=True)


# -- bad input ----------------------------------------------------------------------
def test_bad_records_quarantined_good_ones_proceed_original_archived(home):
    lines = [json.dumps(fact(1)).encode(),
             json.dumps({k: v for k, v in fact(2).items() if k != "prompt"}).encode(),
             json.dumps(fact(3, subject=3)).encode(),
             json.dumps(fact(4, target_new="   ")).encode(),
             json.dumps(fact(5, prompt="p" * 2001)).encode(),
             json.dumps(fact(6)).encode().replace(b"Subject 6", b"Subject \xff6", 1),
             b'{"subject": "Subject 7", "prompt": ',
             json.dumps(fact(8, target_new="Old 8")).encode(),
             json.dumps(fact(9)).encode()]
    raw = b"\n".join(lines) + b"\n"
    put(home, "mixed.jsonl", raw)
    r = ingest(home)
    balanced(r)
    assert (r.records_in, r.accepted, r.quarantined, r.duplicates) == (9, 2, 7, 0)
    rejects = {x["line"]: x for x in map(json.loads,
                                          Path(r.quarantine[0]).read_text().splitlines())}
    assert {k: (v["field"], v["reason"].split(":")[0]) for k, v in rejects.items()} == {
        2: ("prompt", "missing required field"),
        3: ("subject", "expected a string, got int"),
        4: ("target_new", "empty or whitespace-only string"),
        5: ("prompt", "string longer than 2000 characters"),
        6: (None, "undecodable bytes"),
        7: (None, "malformed JSON"),
        8: ("target_new", "target_new equals target_old"),
    }
    assert all(x["file"].endswith("mixed.jsonl") for x in rejects.values())
    assert sorted(batch_frame(home, r.batch)["source_line"]) == [1, 9]
    archived = Path(rejects[2]["archived"])
    assert archived.read_bytes() == raw and archived.parent.parent == home.archive

    # the same bytes again, under another name: nothing is taken in twice
    put(home, "mixed-again.jsonl", raw)
    r2 = ingest(home)
    assert (r2.records_in, r2.accepted, r2.batch) == (0, 0, None)
    assert len(r2.files_skipped) == 1 and "already ingested" in r2.files_skipped[0]["reason"]
    assert version.tags(home.workspace) == [r.batch]
    assert archived.exists()                     # never deleted
    # the same records in a different file are duplicates of what was accepted
    put(home, "reordered.jsonl", [fact(9), fact(1)])
    r3 = ingest(home)
    balanced(r3)
    assert (r3.accepted, r3.duplicates, r3.batch) == (0, 2, None)
    assert r3.duplicate_counts["already_ingested"] == 2
    assert_consistent(home)


# -- deduplication --------------------------------------------------------------------
def test_duplicates_within_and_across_files_via_an_fsspec_inbox(home):
    inbox = f"memory://ledit-test-{os.getpid()}/inbox"
    same = fact(1)
    spaced = fact(1, subject="  subject   1 ", prompt="The EMPLOYER of Subject 1 is ",
                  target_new="company 1")          # the same fact and content, normalised
    put(home, "a.jsonl", [same, same, fact(2), spaced], inbox=inbox)
    put(home, "b.jsonl", [fact(2), fact(3), same], inbox=inbox)
    assert len(list_inbox(inbox)) == 2
    r = ingest(home, inbox=inbox)
    balanced(r)
    assert (r.records_in, r.accepted, r.duplicates) == (7, 3, 4)
    assert r.duplicate_counts["duplicate"] == 4
    df = batch_frame(home, r.batch)
    assert sorted(df["subject"]) == ["Subject 1", "Subject 2", "Subject 3"]
    assert df.filter(pl.col("subject") == "Subject 1")["source_file"].item().endswith("b.jsonl")
    assert list_inbox(inbox) == []
    dups = pl.read_parquet(home.run_dir(r.runs[-1]) / "duplicates.parquet")
    assert dups.height == 4 and set(dups["dedupe_status"]) == {"duplicate"}


def test_latest_observed_at_wins_within_and_across_batches(home):
    put(home, "v.jsonl", [fact(1, target_new="B", observed_at="2024-03-01T00:00:00Z"),
                          fact(1, target_new="C", observed_at="2024-05-01T09:00:00+02:00"),
                          fact(1, target_new="A", observed_at="2024-01-01")])
    r = ingest(home)
    balanced(r)
    assert (r.accepted, r.duplicate_counts["superseded"]) == (1, 2)
    assert batch_frame(home, r.batch)["target_new"].to_list() == ["C"]
    # an older update arriving later is stale; a newer one wins
    put(home, "old.jsonl", [fact(1, target_new="D", observed_at="2024-04-01")])
    r2 = ingest(home)
    assert (r2.accepted, r2.duplicate_counts["stale"], r2.batch) == (0, 1, None)
    put(home, "new.jsonl", [fact(1, target_new="E", observed_at="2024-06-01")])
    r3 = ingest(home)
    assert r3.accepted == 1 and batch_frame(home, r3.batch)["target_new"].to_list() == ["E"]
    assert ledger.latest_facts(home).filter(pl.col("batch") == r3.batch).height == 1
    assert_consistent(home)


def test_updates_identical_to_applied_edits_are_skipped(home):
    put(home, "first.jsonl", [fact(1), fact(2)])
    r = ingest(home)
    df = batch_frame(home, r.batch)
    fid1, fid2 = df["fact_id"].to_list()
    assert ledger.mark_applied(home, [(fid1, "Company 1"), {"fact_id": fid2,
                                                             "target_new": "Company 2"}],
                               run="train-1", adapter="v1") == 2
    # the same edits again (new source, later observation) and one real change
    put(home, "again.jsonl", [fact(1, source="feed-b", observed_at="2030-01-01",
                                   rephrase_prompts=["Subject 1 works at"]),
                              fact(2, target_new="  COMPANY 2 ", observed_at="2030-01-01"),
                              fact(3)])
    r2 = ingest(home)
    balanced(r2)
    assert r2.duplicate_counts["already_applied"] == 2 and r2.accepted == 1
    assert batch_frame(home, r2.batch)["subject"].to_list() == ["Subject 3"]
    applied = ledger.applied_edits(home)
    assert set(applied["run"]) == {"train-1"} and applied.height == 2
    # after a retraction is applied, the old target is a real update again
    ledger.mark_applied(home, [{"fact_id": fid1, "op": "retract"}])
    put(home, "back.jsonl", [fact(1, observed_at="2031-01-01")])
    r3 = ingest(home)
    assert r3.accepted == 1
    assert_consistent(home)


# -- crashes --------------------------------------------------------------------------
CRASHES = {  # fault point: (journal phase left behind, batch tags made before the crash)
    "after_claim": ("claimed", 0), "after_parquet_write": ("staged", 0),
    "after_dvc_add": ("written", 0), "after_ledger": ("committed", 1),
}


@pytest.mark.parametrize("point", list(CRASHES))
def test_crash_between_steps_is_finished_by_the_next_ingest(home, point):
    put(home, "a.jsonl", [fact(i) for i in range(5)] + [fact(0), {"subject": "x"}])
    with pytest.raises(InjectedFault):
        ingest(home, fault=point)
    j = read_journal(home)
    assert j["phase"] == CRASHES[point][0]
    # claimed = archived and in the journal; the inbox is drained at once or on recovery
    assert len(list_inbox(home.inbox_url)) == (1 if point == "after_claim" else 0)
    assert len(version.tags(home.workspace)) == CRASHES[point][1]
    put(home, "b.jsonl", [fact(5), fact(1)])           # new work waits behind the recovery
    r = ingest(home)
    balanced(r)
    assert r.recovered == [j["run_id"]] and len(r.runs) == 2
    assert (r.records_in, r.accepted, r.duplicates, r.quarantined) == (9, 6, 2, 1)
    report = json.loads((home.run_dir(j["run_id"]) / "report.json").read_text())
    assert report["phase"] == "done" and j.get("batch", report["batch"]) == report["batch"]
    tags = version.tags(home.workspace)
    assert len(tags) == 2 and tags[0] == report["batch"] == r.batches[0]
    first = batch_frame(home, tags[0])
    assert sorted(first["subject"]) == [f"Subject {i}" for i in range(5)]
    assert batch_frame(home, tags[1])["subject"].to_list() == ["Subject 5"]
    assert ledger.latest_facts(home).height == 6
    log = version.git(home.workspace, "log", "--format=%s").stdout.splitlines()
    assert sum(1 for line in log if line.startswith(report["batch"] + ":")) == 1
    assert_consistent(home, dvc_status=point == "after_dvc_add")


def _cli(home: Home, *args, env=None):
    return subprocess.run([sys.executable, "-m", "flows.cli.ingest", *args, "--home",
                           str(home.root)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_cli_crash_after_commit_then_recovery_reports_json(home):
    put(home, "a.jsonl", [fact(1), fact(2)])
    crashed = _cli(home, "ingest", "--json", env={FAULT_ENV: "after_commit"})
    assert crashed.returncode != 0 and "injected fault at after_commit" in crashed.stderr
    j = read_journal(home)
    assert j["phase"] == "added" and version.tag_exists(home.workspace, j["batch"])
    done = _cli(home, "ingest", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["batch"] == j["batch"] and out["accepted"] == 2 and out["recovered"]
    assert out["records_in"] == out["accepted"] + out["duplicates"] + out["quarantined"]
    assert out["dvc_md5"] == version.dvc_md5(home.workspace, f"batches/{out['batch']}.parquet")
    assert version.tags(home.workspace) == [j["batch"]]
    assert_consistent(home, dvc_status=True)


def test_two_ingests_at_once_do_not_corrupt(home):
    for k in range(3):
        put(home, f"f{k}.jsonl", [fact(10 * k + i) for i in range(10)] + [fact(0)])
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli.ingest", "ingest", "--json",
                               "--home", str(home.root)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sum(o["records_in"] for o in outs) == 33
    assert sum(o["accepted"] for o in outs) == 30
    assert sum(o["duplicates"] for o in outs) == 3
    assert sorted(o["batch"] is None for o in outs) == [False, True]   # one took all, one none
    assert len(version.tags(home.workspace)) == 1
    assert ledger.latest_facts(home).height == 30 and len(ledger.ingested_files(home)) == 3
    assert_consistent(home)


def test_lock_is_held_during_ingest(home):
    from filelock import Timeout

    put(home, "a.jsonl", [fact(1)])
    with home.lock():
        with pytest.raises(Timeout):
            ingest(home, lock_timeout=0.2)
    assert len(list_inbox(home.inbox_url)) == 1       # nothing was touched


# -- command line ---------------------------------------------------------------------
def test_cli_init_submit_ingest(tmp_path, home):
    runner = CliRunner()
    res = runner.invoke(data_main, ["init", "--home", str(home.root)])
    assert res.exit_code == 0 and str(home.workspace) in res.output
    src = tmp_path / "facts.jsonl"
    src.write_text(json.dumps(fact(1)) + "\n", encoding="utf-8")
    res = runner.invoke(data_main, ["submit", "--home", str(home.root), str(src)])
    assert res.exit_code == 0 and res.output.strip().endswith("-facts.jsonl")
    res = runner.invoke(data_main, ["ingest", "--home", str(home.root)])
    assert res.exit_code == 0, res.output
    assert "accepted     1" in res.output and "batch        batch-" in res.output
    res = runner.invoke(data_main, ["ingest", "--json"], env={"LEDIT_HOME": str(home.root)})
    out = json.loads(res.output.strip().splitlines()[-1])
    assert {k: out[k] for k in ("records_in", "accepted", "duplicates", "quarantined",
                                "batch", "dvc_md5")} == {
        "records_in": 0, "accepted": 0, "duplicates": 0, "quarantined": 0, "batch": None,
        "dvc_md5": None}
    for cmd in ("init", "submit", "ingest", "prepare"):
        res = runner.invoke(data_main, [cmd, "--help"])
        assert res.exit_code == 0 and "--home" in res.output and "LEDIT_HOME" in res.output


def test_plain_functions_run_without_prefect_and_wrap_as_tasks(home):
    plain = ("ingest", "journal", "staging", "sources", "readers", "validate", "dedupe", "ledger",
             "version", "prepare", "workspace")
    code = ("import sys, " + ", ".join(f"tasks.stream.{m}" for m in plain)
            + ", flows.cli.ingest; sys.exit('prefect' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    from tasks.stream.tasks import ingest_task, mark_applied_task

    put(home, "a.jsonl", [fact(1)])
    out = ingest_task.fn(str(home.root))             # the plain function, no server
    assert out["accepted"] == 1 and out["batch"]
    assert mark_applied_task.fn([("f-x", "y")], home=str(home.root)) == 1
    from tasks.stream.ingest import status

    st = status(home)
    assert st["batches"] == [out["batch"]] and st["pending_run"] is None
    assert st["inbox_files"] == 0 and st["files_ingested"] == 1


def test_ledit_group_has_the_data_commands():
    pytest.importorskip("flows.cli.edit")
    from flows.cli import main

    assert {"init", "submit", "ingest", "prepare"} <= set(main.commands)


def test_init_with_custom_inbox_and_remote(tmp_path):
    h = init_workspace(tmp_path / "h", inbox=str(tmp_path / "drop"), remote=str(tmp_path / "rem"))
    assert h.inbox_url == str(tmp_path / "drop") and (tmp_path / "drop").is_dir()
    cfg = (h.workspace / ".dvc" / "config").read_text()
    assert str(tmp_path / "rem") in cfg
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps(fact(1)) + "\n")
    submit([src], h)
    r = ingest(h)
    assert r.accepted == 1
    assert (tmp_path / "rem" / "files" / "md5" / r.dvc_md5[:2] / r.dvc_md5[2:]).exists()

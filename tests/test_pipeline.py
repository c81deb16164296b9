"""The pipeline: Prefect flows (one ``prefect_test_harness`` for the session, with its own
PREFECT_HOME), a real SQLite MLflow and a real git + DVC workspace in temporary directories,
and a tiny random Llama saved to disk so the flows load it by path like any model.

The tiny model learns little in 5 steps, so most tests set the gate's thresholds to zero: they
test the mechanics (promotion, rejection, rollback, locking, recovery, lineage), not quality.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from editing.config import merge, read_yaml
from tasks.pipeline.gate import open_thresholds

ROOT = Path(__file__).resolve().parent.parent
OPEN_GATE = {**open_thresholds().thresholds(),
             # small, so that the tiny model's runs stay quick; every check still runs
             "probes": {"standing_size": 3, "standing_tokens": 4, "subject_probes": 2,
                        "subject_tokens": 4, "strict_facts": 4, "strict_tokens": 4}}


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harness(prefect_api, tmp_path_factory):
    """The Prefect API and, for this module only, one SQLite MLflow database (each test uses
    its own experiment and registered model, so the migrations run once)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    yield prefect_api
    mp.undo()


def make_params(tiny_dir, name: str, gate: dict | None = None, **pipeline) -> dict:
    return merge(read_yaml(ROOT / "params.yaml"), {
        "model": {"name": str(tiny_dir), "dtype": "float32"},
        "edit": {"layers": [2], "steps": 5, "batch_size": 16, "early_stop": {"check_every": 5},
                 "baft": {"gate_layer": 1, "prefixes": 1, "prefix_tokens": 3, "subject_swaps": 1}},
        "eval": {"fluency_tokens": 0},
        "gate": {**OPEN_GATE, **(gate or {})},
        "pipeline": {"experiment": f"exp-{name}", "registered_model": f"model-{name}",
                     "lock_timeout_s": 600, "log_pyfunc": False, **pipeline}})


def fact(i: int, **kw) -> dict:
    rec = {"subject": f"Person {i}", "prompt": f"Person {i} works in the city of",
           "target_new": f"Town{i}", "relation": "work location",
           "rephrase_prompts": [f"The workplace of Person {i} is in"],
           "locality": [{"prompt": "The capital of France is", "answer": "Paris"}]}
    rec.update(kw)
    return rec


def feed(h, tmp: Path, name: str, records: list[dict]) -> None:
    from tasks.stream.sources import submit

    src = tmp / name
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    submit([src], h)


@pytest.fixture()
def home(tmp_path):
    from tasks.stream.workspace import init_workspace
    return init_workspace(tmp_path / "home")


def fact_ids(records):
    from editing.facts import Fact
    return sorted(Fact(**{k: v for k, v in r.items()}).fact_id for r in records)


# -- end to end ----------------------------------------------------------------------------------
def test_nightly_refresh_promotes_end_to_end(harness, tiny_dir, home, tmp_path):
    from editing import AdapterSet
    from flows.nightly import nightly_refresh
    from prefect.artifacts import Artifact
    from tasks.stream import ledger
    from tasks.pipeline import tracking
    from tasks.pipeline import store as pub

    params = make_params(tiny_dir, "e2e", log_pyfunc=True)
    records = [fact(1), fact(2)]
    feed(home, tmp_path, "day1.jsonl", records)
    s = nightly_refresh(home=str(home.root), params=params)

    assert s["status"] == "promoted" and s["version"] == "v1"
    assert s["production_version"] == "v1" and pub.production_version(home) == "v1"
    assert set(s) >= {"mlflow_run_id", "reliability", "generality", "retention", "locality", "drift"}
    production = AdapterSet.load(home.root / "published" / "production")
    assert sorted(production.fact_ids) == fact_ids(records)
    assert sorted(ledger.applied_edits(home)["fact_id"].to_list()) == fact_ids(records)

    # MLflow: params, metrics, dataset input (digest = DVC md5, name = git tag), artifacts, registry
    cl = tracking.client(home)
    run = cl.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["edit.steps"] == "5" and run.data.params["gate.max_drift"]
    assert run.data.params["base_fingerprint"].startswith("sha256:") and "code_version" in run.data.params
    assert run.data.tags["prefect.flow_run_id"] == s["flow_run_id"]
    assert run.data.tags["ledit.status"] == "promoted" and run.data.tags["gate"] == "passed"
    assert {"reliability", "generality", "locality", "drift", "train_seconds"} <= set(run.data.metrics)
    (batch,) = s["batches"]
    md5 = json.loads((home.workspace / "batches" / f"{batch}.json").read_text())["dvc_md5"]
    (ds,) = run.inputs.dataset_inputs
    assert (ds.dataset.name, ds.dataset.digest, ds.dataset.source_type) == (batch, md5, "dvc")
    assert json.loads(ds.dataset.source)["git_tag"] == batch
    arts = {a.path for a in cl.list_artifacts(s["mlflow_run_id"], "adapter_set")}
    assert "adapter_set/manifest.json" in arts
    assert {a.path for a in cl.list_artifacts(s["mlflow_run_id"], "evaluation")} >= {
        "evaluation/per_fact.parquet", "evaluation/metrics.json"}
    assert "plots/quality_across_versions.png" in {a.path for a in cl.list_artifacts(s["mlflow_run_id"], "plots")}
    (child,) = cl.search_runs([run.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{s['mlflow_run_id']}'")
    assert child.data.metrics["reliability"] == pytest.approx(s["reliability"])
    mv = cl.get_model_version_by_alias("model-e2e", "production")
    assert str(mv.version) == s["model_version"] and mv.tags["ledit.batches"] == batch
    assert mv.tags["ledit.dvc_md5"] == md5 and mv.run_id == s["mlflow_run_id"]
    assert mv.source.startswith("models:/")      # the pyfunc model: servable at @production

    # Prefect UI: a summary, the table of edits, the gate and the progress
    summary = Artifact.get("ledit-run-summary")
    assert summary is not None and "promoted" in summary.data
    assert Artifact.get("ledit-edits") is not None and Artifact.get("ledit-gate") is not None
    assert Artifact.get("ledit-progress") is not None
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler
    APILogHandler().flush()                                      # logs are shipped in batches
    with get_client(sync_client=True) as client:                 # named for what and when
        assert client.read_flow_run(s["flow_run_id"]).name.startswith("nightly-20")
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[s["flow_run_id"]])))
    assert any(x.message.startswith("ledit run: promoted v1") for x in logs)

    # nothing new: nothing to do, production untouched
    again = nightly_refresh(home=str(home.root), params=params)
    assert again["status"] == "nothing-to-do" and again["production_version"] == "v1"


# -- the gate, rejection, retries, lineage, rollback ------------------------------------------------
def test_reject_keeps_production_then_pending_facts_retry_lineage_and_rollback(harness, tiny_dir, home,
                                                                                 tmp_path):
    from prefect.artifacts import Artifact

    from flows.nightly import nightly_refresh, rollback
    from tasks.stream import ledger
    from tasks.pipeline import tracking
    from tasks.pipeline import store as pub
    from tasks.pipeline.lineage import lineage
    from tasks.pipeline.state import PipelineError, pending_facts

    params = make_params(tiny_dir, "reject")
    feed(home, tmp_path, "day1.jsonl", [fact(1)])
    assert nightly_refresh(home=str(home.root), params=params)["status"] == "promoted"

    # a threshold above 1.0 can never pass: rejected, production unchanged, facts pending
    strict = make_params(tiny_dir, "reject", gate={"min_reliability": 1.01})
    feed(home, tmp_path, "day2.jsonl", [fact(2), fact(3)])
    s = nightly_refresh(home=str(home.root), params=strict)
    assert (s["status"], s["version"], s["production_version"]) == ("rejected", "v2", "v1")
    assert any("reliability" in r for r in s["reasons"])
    assert pub.production_version(home) == "v1" and not (home.root / "published" / "v2").exists()
    cl = tracking.client(home)
    assert str(cl.get_model_version_by_alias("model-reject", "production").version) == "1"
    mv2 = cl.get_model_version("model-reject", s["model_version"])
    assert mv2.tags["gate"] == "rejected" and "reliability" in mv2.tags["gate.reasons"]
    run = cl.get_run(s["mlflow_run_id"])
    assert run.data.tags["gate"] == "rejected" and "reliability" in run.data.tags["gate.reasons"]
    assert "rejected" in Artifact.get("ledit-gate").data
    pending = pending_facts(home)
    assert sorted(p["fact_id"] for p in pending) == fact_ids([fact(2), fact(3)])
    assert all("v2 rejected" in p["reason"] and p["attempts"] == 1 for p in pending)
    assert sorted(ledger.applied_edits(home)["fact_id"].to_list()) == fact_ids([fact(1)])
    f2 = fact_ids([fact(2)])[0]
    info = lineage(home, f2)
    assert info["status"] == "pending" and "v2 rejected" in info["pending"]["reason"]

    # the next run retries the pending facts (nothing new arrived) and promotes them
    s3 = nightly_refresh(home=str(home.root), params=params)
    assert (s3["status"], s3["version"], s3["batches"]) == ("promoted", "v3", [])
    assert pending_facts(home) == []
    live = pub.load_production(home)[1].fact_ids
    assert sorted(live) == fact_ids([fact(1), fact(2), fact(3)])

    # lineage: source file and line, batch (git tag, DVC md5), MLflow run, version, gate metrics
    info = lineage(home, f2)
    assert info["status"] == "live" and info["live_in"] == "v3"
    (record,) = info["records"]
    assert record["source_file"].endswith("day2.jsonl") and record["source_line"] == 1
    assert record["batch"].startswith("batch-") and len(record["dvc_md5"]) == 32
    assert [c["version"] for c in info["candidates"]] == ["v2", "v3"]
    v3 = info["candidates"][-1]
    assert v3["mlflow_run_id"] == s3["mlflow_run_id"] and v3["model_version"] == s3["model_version"]
    assert v3["gate_passed"] is True and v3["gate_metrics"]["reliability"] is not None
    tags = cl.get_run(s3["mlflow_run_id"]).data.tags
    assert tags[f"fact.{f2}"].split(" (")[0].endswith("day2.jsonl:1")     # the source first
    description = tags["mlflow.note.content"]                             # the run page's first box
    assert "Gate for v3" in description and "| check | value | threshold | result |" in description
    assert f"`{f2}`" in description and "day2.jsonl:1" in description

    # rollback: pointer and alias back to v1; the ledger follows; a rejected version is refused
    out = rollback("v1", home=str(home.root), params=params)
    assert (out["previous"], out["version"]) == ("v3", "v1")
    assert pub.production_version(home) == "v1"
    assert str(cl.get_model_version_by_alias("model-reject", "production").version) == "1"
    applied = dict(ledger.applied_edits(home).select("fact_id", "op").iter_rows())
    assert applied[f2] == "retract" and applied[fact_ids([fact(1)])[0]] == "upsert"
    assert lineage(home, f2)["status"] == "rolled-back"
    with pytest.raises(PipelineError, match="never promoted"):
        rollback("v2", home=str(home.root), params=params)
    assert pub.production_version(home) == "v1"

    # a retract of a live fact is promoted: the fact is gone, lineage says retracted
    f1 = fact_ids([fact(1)])[0]
    feed(home, tmp_path, "day3.jsonl", [{"op": "retract", "fact_id": f1}])
    s5 = nightly_refresh(home=str(home.root), params=params)
    assert s5["status"] == "promoted" and s5["changes"]["retracted"] == [f1]
    assert f1 not in pub.load_production(home)[1].fact_ids
    assert lineage(home, f1)["status"] == "retracted"


# -- reliability --------------------------------------------------------------------------------
def test_concurrent_triggers_are_serialised_and_apply_each_edit_once(harness, tiny_dir, home, tmp_path):
    from flows.nightly import nightly_refresh
    from tasks.stream import ledger
    from tasks.pipeline import store as pub

    params = make_params(tiny_dir, "concurrent")
    records = [fact(1), fact(2)]
    feed(home, tmp_path, "day1.jsonl", records)
    results, errors = [], []

    def trigger():
        try:
            results.append(nightly_refresh(home=str(home.root), params=params))
        except BaseException as exc:   # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert sorted(r["status"] for r in results) == ["nothing-to-do", "promoted"]
    assert [r["version"] for r in pub.list_records(home)] == ["v1"]
    live = pub.load_production(home)[1].fact_ids
    assert sorted(live) == fact_ids(records)             # each edit once
    applied = ledger.applied_edits(home)["fact_id"].to_list()
    assert sorted(applied) == fact_ids(records)


def test_a_crash_leaves_production_untouched_and_the_next_run_applies_each_edit_once(
        harness, tiny_dir, home, tmp_path, monkeypatch):
    from flows.nightly import nightly_refresh
    from tasks.stream import ledger
    from tasks.pipeline import tracking
    from tasks.pipeline import store as pub
    from tasks.faults import FAULT_ENV, InjectedFault

    params = make_params(tiny_dir, "crash")
    feed(home, tmp_path, "day1.jsonl", [fact(1)])
    assert nightly_refresh(home=str(home.root), params=params)["version"] == "v1"
    before = (home.root / "published" / "v1" / "adapter.safetensors").read_bytes()

    # killed during training: production untouched, the run marked failed
    feed(home, tmp_path, "day2.jsonl", [fact(2)])
    monkeypatch.setenv(FAULT_ENV, "during_training")
    with pytest.raises(InjectedFault):
        nightly_refresh(home=str(home.root), params=params)
    monkeypatch.delenv(FAULT_ENV)
    assert pub.production_version(home) == "v1"
    assert (home.root / "published" / "v1" / "adapter.safetensors").read_bytes() == before
    crashed = pub.read_record(home, "v2")
    assert crashed["status"] == "abandoned"
    assert tracking.client(home).get_run(crashed["mlflow_run_id"]).info.status == "FAILED"

    s = nightly_refresh(home=str(home.root), params=params)      # redoes the work
    assert (s["status"], s["version"]) == ("promoted", "v3")
    live = pub.load_production(home)[1].fact_ids
    assert sorted(live) == fact_ids([fact(1), fact(2)])

    # killed right after publishing: the next run finishes the promotion, trains nothing again
    feed(home, tmp_path, "day3.jsonl", [fact(3)])
    monkeypatch.setenv(FAULT_ENV, "after_publish")
    with pytest.raises(InjectedFault):
        nightly_refresh(home=str(home.root), params=params)
    monkeypatch.delenv(FAULT_ENV)
    assert pub.production_version(home) == "v4"
    s = nightly_refresh(home=str(home.root), params=params)
    assert s["status"] == "nothing-to-do" and s["production_version"] == "v4"
    assert pub.read_record(home, "v4")["status"] == "promoted"
    assert str(tracking.client(home).get_model_version_by_alias("model-crash", "production").version) \
        == pub.read_record(home, "v4")["model_version"]
    live = pub.load_production(home)[1].fact_ids
    assert sorted(live) == fact_ids([fact(1), fact(2), fact(3)]) and len(live) == len(set(live))
    applied = ledger.applied_edits(home)["fact_id"].to_list()
    assert sorted(applied) == fact_ids([fact(1), fact(2), fact(3)])


def test_a_process_killed_during_training_leaves_production_and_the_next_run_redoes_it(
        harness, tiny_dir, home, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import yaml
    from prefect.settings import PREFECT_API_URL

    from flows.nightly import nightly_refresh
    from tasks.stream import ledger
    from tasks.pipeline import store as pub

    params = make_params(tiny_dir, "kill")
    feed(home, tmp_path, "day1.jsonl", [fact(1)])
    assert nightly_refresh(home=str(home.root), params=params)["version"] == "v1"
    before = (home.root / "published" / "v1" / "adapter.safetensors").read_bytes()
    feed(home, tmp_path, "day2.jsonl", [fact(2)])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = dict(os.environ, LEDIT_PARAMS=str(tmp_path / "params.yaml"), PREFECT_API_URL=PREFECT_API_URL.value(),
               LEDIT_INJECT_FAULT="during_training:kill", PYTHONPATH=str(ROOT))
    killed = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--home", str(home.root), "--json"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert pub.production_version(home) == "v1"
    assert (home.root / "published" / "v1" / "adapter.safetensors").read_bytes() == before

    s = nightly_refresh(home=str(home.root), params=params)       # the lock is free; the work is redone
    assert s["status"] == "promoted"
    live = pub.load_production(home)[1].fact_ids
    assert sorted(live) == fact_ids([fact(1), fact(2)]) and len(live) == len(set(live))
    assert sorted(ledger.applied_edits(home)["fact_id"].to_list()) == fact_ids([fact(1), fact(2)])


def test_a_corrupted_published_adapter_is_refused(harness, tiny_dir, home, tmp_path):
    from editing import AdapterError
    from flows.nightly import nightly_refresh, rollback
    from tasks.pipeline import store as pub

    params = make_params(tiny_dir, "corrupt")
    feed(home, tmp_path, "day1.jsonl", [fact(1)])
    assert nightly_refresh(home=str(home.root), params=params)["status"] == "promoted"
    weights = home.root / "published" / "v1" / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum"):
        pub.load_production(home)
    feed(home, tmp_path, "day2.jsonl", [fact(2)])
    with pytest.raises(AdapterError, match="corrupted"):
        nightly_refresh(home=str(home.root), params=params)     # stops before training anything
    with pytest.raises(AdapterError):
        rollback("v1", home=str(home.root), params=params)
    assert pub.production_version(home) == "v1" and [r["version"] for r in pub.list_records(home)] == ["v1"]


# -- command line --------------------------------------------------------------------------------
def test_cli_demo_run_json_lineage_pending_and_rollback(harness, tiny_dir, tmp_path, monkeypatch):
    import yaml
    from click.testing import CliRunner

    from flows.cli import main

    params = make_params(tiny_dir, "cli")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.setenv("LEDIT_PARAMS", str(tmp_path / "params.yaml"))
    home = tmp_path / "home"
    runner = CliRunner()

    demo = runner.invoke(main, ["demo", "--home", str(home)])
    assert demo.exit_code == 0, demo.output
    assert "status       promoted" in demo.stdout and "ledit server" in demo.stdout

    src = tmp_path / "more.jsonl"
    src.write_text(json.dumps(fact(7)) + "\n", encoding="utf-8")
    run = runner.invoke(main, ["run", "--home", str(home), "--facts", str(src), "--json"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["status"] == "promoted" and out["version"] == "v2" and out["mlflow_run_id"]
    assert {"reliability", "generality", "retention", "locality", "drift"} <= set(out)
    assert out["retention"] is not None                 # the 8 demo facts were live before

    dry = runner.invoke(main, ["run", "--home", str(home), "--dry-run", "--force", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout.strip().splitlines()[-1])["status"] == "dry-run"

    fid = fact_ids([fact(7)])[0]
    lin = runner.invoke(main, ["lineage", "--home", str(home), fid, "--json"])
    info = json.loads(lin.stdout.strip().splitlines()[-1])
    assert info["status"] == "live" and info["records"][0]["source_file"].endswith("more.jsonl")
    assert runner.invoke(main, ["lineage", "--home", str(home), "no-such-fact"]).exit_code == 1
    # ledit why from production, with each edit's lineage (threshold 0: every edit counts as fired)
    why = runner.invoke(main, ["why", "--home", str(home), "--json", "--threshold", "0",
                               "--max-new-tokens", "2", fact(7)["prompt"]])
    assert why.exit_code == 0, why.output
    answer = json.loads(why.stdout.strip().splitlines()[-1])
    traced = {f["fact_id"]: f["lineage"] for f in answer["firings"]}
    assert answer["adapter"] == "v2" and len(traced) == 9          # the 8 demo facts and fact 7
    assert traced[fid]["status"] == "live" and traced[fid]["live_in"] == "v2"
    assert traced[fid]["source_file"].endswith("more.jsonl") and traced[fid]["mlflow_run_id"] == out["mlflow_run_id"]
    pend = runner.invoke(main, ["pending", "--home", str(home), "--json"])
    assert json.loads(pend.stdout) == []
    back = runner.invoke(main, ["rollback", "--home", str(home), "v1", "--json"])
    assert back.exit_code == 0, back.output
    assert json.loads(back.stdout.strip().splitlines()[-1])["version"] == "v1"
    bad = runner.invoke(main, ["rollback", "--home", str(home), "v99"])
    assert bad.exit_code != 0 and "no adapter version v99" in bad.output


# -- plain parts, no flow ----------------------------------------------------------------------------
def test_a_batch_record_todays_rules_refuse_is_skipped_not_fatal(tiny_dir, home, tmp_path, monkeypatch):
    """A batch ingested under older rules may hold a record the current rules refuse: that
    record is skipped with its reason, and the rest of the batch is planned."""
    import editing.facts as facts_module
    from tasks.stream.ingest import ingest
    from tasks.pipeline.batches import batch_edits, unprocessed_batches
    from tasks.pipeline.plan import plan
    from tasks.settings import as_settings

    feed(home, tmp_path, "day1.jsonl", [fact(1), fact(2)])
    ingest(home)
    (batch,) = unprocessed_batches(home)
    refused_id = fact_ids([fact(2)])[0]
    real = facts_module.fact_from_record

    def stricter(rec, **kw):              # a rule added after the batch was accepted
        if rec.get("subject") == "Person 2":
            raise facts_module.FactError("a newer rule", field="subject", **kw)
        return real(rec, **kw)

    monkeypatch.setattr(facts_module, "fact_from_record", stricter)
    items = batch_edits(home, batch["tag"], batch["dvc_md5"])
    assert [bool(i.get("refused")) for i in items].count(True) == 1
    p = plan(home, as_settings(make_params(tiny_dir, "refused")), [batch], [items])
    assert p["status"] == "planned" and p["upserts"] == 1
    (skip,) = p["skipped"]
    assert skip["fact_id"] == refused_id and "a newer rule" in skip["reason"] and "field 'subject'" in skip["reason"]


def test_gate_thresholds_and_reasons():
    from tasks.pipeline.gate import GateConfigError, gate
    from tasks.settings import GateSettings, Settings, load_settings

    params = load_settings(ROOT / "params.yaml").gate
    good = {"reliability": 1.0, "generality": 0.6, "retention": None, "locality": 0.95, "drift": 0.01}
    v = gate(good, [{"fact_id": "a", "kind": "new", "reliability": 1.0, "generality": 0.6}], params)
    assert v.passed and not v.reasons
    assert next(c for c in v.checks if c.metric == "retention").value is None   # not measured
    bad = dict(good, drift=0.2, retention=0.5)
    v = gate(bad, [{"fact_id": "b", "kind": "new", "reliability": 0.25, "generality": 0.0}], params)
    assert not v.passed and len(v.reasons) == 2
    assert any(r.startswith("drift 0.200") for r in v.reasons)
    assert "reliability 0.25 < 0.5" in v.fact_reasons["b"]
    with pytest.raises(GateConfigError, match="gate.max_drift"):
        gate(good, [], GateSettings.from_dict(dict(params.to_dict(), max_drift="high")))
    with pytest.raises(GateConfigError, match="no 'gate' section"):
        gate(good, [], Settings.from_dict({}).gate)


def test_prefect_yaml_deploys_the_flows_on_a_gpu_pool():
    import importlib

    import yaml

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"nightly", "manual", "rollback"} <= set(deployments)
    nightly = deployments["nightly"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    for d in deployments.values():
        assert d["work_pool"]["name"] == "gpu"
        path, name = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, name), "to_deployment")


def test_server_commands_listen_on_localhost_with_sqlite_under_home(tmp_path):
    from flows.cli.server import server_commands

    (prefect_name, prefect, env), (mlflow_name, mlflow, _) = server_commands(tmp_path)
    assert prefect[1:3] == ["server", "start"] and prefect[prefect.index("--host") + 1] == "127.0.0.1"
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith(f"{tmp_path}/prefect.db")
    assert mlflow[mlflow.index("--host") + 1] == "127.0.0.1"
    assert mlflow[mlflow.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"


@pytest.mark.integration
def test_nightly_on_the_embedded_model_runs_the_default_gate(harness, tmp_path):
    """The bundled sample stream through the real defaults: SmolLM2, params.yaml's gate
    thresholds (its probe suites cut down, as in tests/test_gate_embedded.py, to keep CI short).
    The edits hold; every check is measured or says why not, and the verdict follows the checks.
    (Whether today's default BaFT passes is tests/test_gate_embedded.py's question.)"""
    from flows.nightly import nightly_refresh
    from tasks.pipeline.gate import GATE_METRICS
    from tasks.stream.sources import submit
    from tasks.stream.workspace import init_workspace

    params = merge(read_yaml(ROOT / "params.yaml"),
                   {"pipeline": {"experiment": "exp-embedded", "registered_model": "model-embedded"},
                    "gate": {"probes": {"standing_size": 12, "strict_facts": 2}}})
    h = init_workspace(tmp_path / "home")
    lines = (ROOT / "data" / "samples" / "nightly-sample.jsonl").read_text().splitlines()[:3]
    (tmp_path / "sample.jsonl").write_text("\n".join(lines) + "\n")     # 3 facts: about a minute
    submit([tmp_path / "sample.jsonl"], h)
    s = nightly_refresh(home=str(h.root), params=params)
    assert s["status"] in ("promoted", "rejected")
    assert s["reliability"] >= params["gate"]["min_reliability"]
    assert all(s[k] is not None or k in s["not_measured"] for k in GATE_METRICS)
    assert (s["status"] == "promoted") == (not s["reasons"])

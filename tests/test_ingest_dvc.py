"""dvc.yaml: the prepare stage run for real through ``dvc repro``, data versions rebuilt
from their tag (even from the remote alone), and the full repro as an integration test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from editing.facts import fact_from_record
from tasks.stream import prepare, version
from tasks.stream.ingest import ingest
from tasks.stream.sources import submit
from tasks.stream.workspace import init_workspace

ROOT = Path(__file__).resolve().parent.parent


def fact(i, **kw):
    rec = {"subject": f"Subject {i}", "prompt": f"The employer of Subject {i} is",
           "target_new": f"Company {i}", "relation": "employer",
           "rephrase_prompts": [f"Subject {i} works for"]}
    rec.update(kw)
    return rec


def ingest_records(h, tmp: Path, name: str, records):
    src = tmp / name
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    submit([src], h)
    return ingest(h)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """A home with two batches: the second updates fact 1 and retracts fact 2."""
    tmp = tmp_path_factory.mktemp("versions")
    h = init_workspace(tmp / "home")
    r1 = ingest_records(h, tmp, "one.jsonl", [fact(1), fact(2), fact(3)])
    r2 = ingest_records(h, tmp, "two.jsonl", [fact(1, target_new="Company 1b"),
                                              {"op": "retract", "subject": "Subject 2",
                                               "prompt": "The employer of Subject 2 is",
                                               "relation": "employer"},
                                              fact(4)])
    assert r1.batch and r2.batch and r1.batch != r2.batch
    return h, r1, r2


def _project(tmp: Path, params_data: dict) -> tuple[Path, dict]:
    """A DVC project using this repository's dvc.yaml and code, with its own params."""
    proj = tmp / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    for d in ("tasks", "editing", "flows"):
        (proj / d).symlink_to(ROOT / d)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] = params_data
    (proj / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1",
           "DO_NOT_TRACK": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=proj, env=env,
                   check=True)
    return proj, env


def _dvc(proj, env, *args):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=proj, env=env,
                          capture_output=True, text=True)


def test_dvc_yaml_defines_prepare_edit_evaluate_with_params_and_metrics():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = spec["stages"]
    assert list(stages) == ["prepare", "edit", "evaluate"]
    assert "build/facts.jsonl" in stages["prepare"]["outs"]
    assert "build/facts.jsonl" in stages["edit"]["deps"]
    assert "build/adapters" in stages["evaluate"]["deps"]
    assert any("build/metrics.json" in m for m in stages["evaluate"]["metrics"])
    assert all(s.get("params") for s in stages.values())


def test_prepare_stage_runs_through_dvc_repro(versions, tmp_path):
    h, r1, _ = versions
    proj, env = _project(tmp_path, {"home": str(h.root), "tag": r1.batch, "scope": "batch"})
    run = _dvc(proj, env, "repro", "prepare")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = (proj / "build" / "facts.jsonl").read_text().splitlines()
    facts = [fact_from_record(json.loads(x)) for x in lines]
    assert sorted(f.subject for f in facts) == ["Subject 1", "Subject 2", "Subject 3"]
    assert {json.loads(x)["batch"] for x in lines} == {r1.batch}
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["params.yaml"]["data"]["tag"] == r1.batch
    assert lock["stages"]["prepare"]["outs"][0]["path"] == "build/facts.jsonl"
    again = _dvc(proj, env, "repro", "prepare")
    assert again.returncode == 0 and "didn't change" in again.stdout
    # a different data version is a different input: the stage reruns
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"]["scope"] = "cumulative"
    params["data"]["tag"] = versions[2].batch
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    third = _dvc(proj, env, "repro", "prepare")
    assert third.returncode == 0 and "Running stage 'prepare'" in third.stdout
    got = {json.loads(x)["subject"]: json.loads(x)["target_new"]
           for x in (proj / "build" / "facts.jsonl").read_text().splitlines()}
    assert got == {"Subject 1": "Company 1b", "Subject 3": "Company 3", "Subject 4": "Company 4"}


def test_data_versions_rebuild_from_tag_even_from_the_remote_alone(versions, tmp_path):
    h, r1, r2 = versions
    assert prepare.batch_tags(h) == [r1.batch, r2.batch]
    # the batch scope of the second version holds the retract only with --include-retracts
    s = prepare.prepare_facts(h, r2.batch, tmp_path / "b2.jsonl")
    assert (s["facts"], s["retracts"]) == (2, 1)
    s = prepare.prepare_facts(h, r2.batch, tmp_path / "b2r.jsonl", include_retracts=True)
    assert s["facts"] == 3
    # cumulative at the first tag is the first batch; "latest" resolves to the last tag
    s = prepare.prepare_facts(h, r1.batch, tmp_path / "c1.jsonl", scope="cumulative")
    assert (s["data_version"], s["facts"]) == (r1.batch, 3)
    assert prepare.prepare_facts(h, "latest", tmp_path / "l.jsonl")["data_version"] == r2.batch
    with pytest.raises(LookupError):
        prepare.prepare_facts(h, "batch-19990101-000000", tmp_path / "x.jsonl")
    # lose the workspace copies and the DVC cache: the tag + remote still rebuild it
    before = (tmp_path / "c1.jsonl").read_bytes()
    backup = tmp_path / "backup"
    shutil.copytree(h.workspace, backup, symlinks=True)
    try:
        for p in (h.workspace / "batches").glob("*.parquet"):
            p.unlink()
        shutil.rmtree(h.workspace / ".dvc" / "cache")
        prepare.prepare_facts(h, r1.batch, tmp_path / "c1-remote.jsonl", scope="cumulative")
        assert (tmp_path / "c1-remote.jsonl").read_bytes() == before
    finally:
        shutil.rmtree(h.workspace)
        shutil.copytree(backup, h.workspace, symlinks=True)


def test_prepare_cli_and_module_entry(versions, tmp_path):
    h, r1, _ = versions
    out = tmp_path / "f.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "tasks.stream.prepare", "facts", "--home", str(h.root),
                          "--tag", r1.batch, "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["facts"] == 3 and len(out.read_text().splitlines()) == 3
    log = tmp_path / "eval.log"
    log.write_text("progress...\n{\"reliability\": 1.0, \"locality\": 0.9}\n")
    run = subprocess.run([sys.executable, "-m", "tasks.stream.prepare", "last-json", str(log),
                          str(tmp_path / "m.json")], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0 and json.loads((tmp_path / "m.json").read_text()) == {
        "reliability": 1.0, "locality": 0.9}


@pytest.mark.integration
def test_full_dvc_repro_rebuilds_an_adapter_set_from_a_data_version(tmp_path, request):
    """prepare -> edit -> evaluate with the embedded model (four facts, about a minute)."""
    h = init_workspace(tmp_path / "home")
    submit([ROOT / "data" / "samples" / "demo-facts.jsonl"], h)
    r = ingest(h)
    proj, env = _project(tmp_path, {"home": str(h.root), "tag": r.batch, "scope": "batch"})
    env["LEDIT_PARAMS"] = str(proj / "params.yaml")
    run = _dvc(proj, env, "repro")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    metrics = json.loads((proj / "build" / "metrics.json").read_text())
    assert metrics and (proj / "build" / "adapters").is_dir()
    show = _dvc(proj, env, "metrics", "show", "--json")
    assert show.returncode == 0
    assert version.tag_exists(h.workspace, r.batch)

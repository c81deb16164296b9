"""Three `ledit run` processes triggered at once, as three operators (or a schedule and two
manual triggers) would: each on Prefect's ephemeral API under the same LEDIT_HOME, a real
SQLite MLflow and a real git + DVC workspace, on the tiny model.

They must be serialised (the pipeline lock), none may fail (no "database is locked", no
Prefect migration race on a new prefect.db), and each edit is applied exactly once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from test_pipeline import fact, fact_ids, make_params

ROOT = Path(__file__).resolve().parent.parent
TRIGGERS = 3


def _env(tmp_path: Path, params: dict) -> dict:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}   # their own ephemeral API
    env.update(LEDIT_PARAMS=str(tmp_path / "params.yaml"), PYTHONPATH=str(ROOT))
    return env


def test_three_triggers_at_once_are_serialised_and_apply_each_edit_once(tiny_dir, tmp_path):
    from tasks.stream import ledger
    from tasks.pipeline import store as pub
    from tasks.stream.workspace import init_workspace

    home = init_workspace(tmp_path / "home")
    params = make_params(tiny_dir, "load")
    params["model"]["threads"] = 1        # processes sharing a host split its cores (README)
    env = _env(tmp_path, params)
    records = [fact(i) for i in range(TRIGGERS)]
    procs = []
    for i, rec in enumerate(records):
        src = tmp_path / f"trigger{i}.jsonl"
        src.write_text(json.dumps(rec) + "\n", encoding="utf-8")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "--home", str(home.root), "--facts", str(src),
             "--json"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]

    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "database is locked" not in err and "already exists" not in err, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert {s["status"] for s in summaries} <= {"promoted", "nothing-to-do"}
    promoted = [s for s in summaries if s["status"] == "promoted"]
    assert promoted, summaries
    # serialised: versions are consecutive and each run saw the production of the one before
    records_on_disk = pub.list_records(home)
    assert [r["status"] for r in records_on_disk] == ["promoted"] * len(promoted)
    assert sorted(s["version"] for s in promoted) == [r["version"] for r in records_on_disk]
    for r in records_on_disk[1:]:
        assert r["base_version"] == f"v{int(r['version'][1:]) - 1}"
    # each edit once: in production and in the applied ledger
    live = pub.load_production(home)[1].fact_ids
    assert sorted(live) == fact_ids(records)
    assert sorted(ledger.applied_edits(home)["fact_id"].to_list()) == fact_ids(records)
    added = [fid for r in records_on_disk for fid in r["changes"]["added"]]
    assert sorted(added) == fact_ids(records)

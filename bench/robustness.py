"""What the stream and the pipeline do with hostile input, faults and load: a table.

    python -m bench.robustness                   # inputs, fault points, infrastructure, load
    python -m bench.robustness --only inputs     # or: kills, infra, load (repeatable)

- **inputs**: every class of bad file (and a few good ones that older readers refused) goes
  through a real `ingest` into one git + DVC workspace, one class per run. A row gives the
  records in, accepted, duplicates and quarantined, the first reason, and the state after:
  whether the journal is clear (the stream not blocked) and whether a good file ingested
  next is accepted.
- **kills**: a real SIGKILL (`LEDIT_INJECT_FAULT=point:kill`) at every fault point of
  `ledit ingest` and `ledit run`, then a normal run. A row gives the killed run's exit
  status, the next run's outcome, and the invariants: every accepted fact live exactly once,
  the published pointer and the MLflow alias `production` naming the same version.
- **infra**: the MLflow database locked or unreachable, the DVC remote unreachable, a full
  disk at the Parquet and the adapter write: the failed run's error, production unchanged,
  the facts still pending, the next run's outcome once the fault is gone.
- **load**: five `ledit run` processes started at once.

Everything runs on a tiny random Llama (the mechanics, not quality) in temporary homes, on
127.0.0.1 only. The table goes to stdout and to bench/results/robustness.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from editing.offline import OFFLINE_ENV

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "robustness.md"
#: small enough that the size classes below stay small files
LIMITS = {"max_file_bytes": 2_000_000, "max_line_bytes": 100_000, "max_records": 5_000,
          "max_depth": 16, "max_read_attempts": 2}
SECTIONS = ("inputs", "kills", "infra", "load")


# -- the hostile inputs -----------------------------------------------------------------------
def rec(i: int, **kw) -> dict:
    r = {"subject": f"Person {i}", "prompt": f"Person {i} works in the city of",
         "target_new": f"Town{i}", "relation": "work location"}
    r.update(kw)
    return r


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def input_classes() -> list[tuple[str, str, bytes]]:
    """``(class, file name, bytes)``: the tester's 16 kinds, their five findings, and more."""
    good = jsonl(rec(1), rec(2))
    text = good.decode()
    deep = "[" * 100_000 + "]" * 100_000
    nested = {"x": None}
    cur = nested
    for _ in range(40):
        cur["x"] = {"x": None}
        cur = cur["x"]
    parquet_bad = b"PAR1" + os.urandom(200) + b"PAR1"
    return [
        ("good JSONL (control)", "good.jsonl", good),
        ("100,000 nested brackets (.json)", "poison.json", deep.encode()),
        ("100,000 nested brackets (.jsonl line)", "poison.jsonl", (deep + "\n").encode() + jsonl(rec(3))),
        ("a record nested 40 deep", "deep.jsonl", jsonl({**rec(4), "extra": nested}, rec(5))),
        ("a line over max_line_bytes", "longline.jsonl",
         jsonl({**rec(6), "source": "x" * (LIMITS["max_line_bytes"] + 10)}, rec(7))),
        ("a file over max_file_bytes", "huge.jsonl", jsonl(*[rec(i) for i in range(
            LIMITS["max_file_bytes"] // 90 + 100)])),
        ("more records than max_records", "many.jsonl", jsonl(*[rec(10_000 + i) for i in range(
            LIMITS["max_records"] + 5)])),
        ("UTF-16-LE with BOM", "utf16le.jsonl", b"\xff\xfe" + jsonl(rec(8)).decode().encode("utf-16-le")),
        ("UTF-16-BE with BOM", "utf16be.jsonl", b"\xfe\xff" + jsonl(rec(9)).decode().encode("utf-16-be")),
        ("UTF-32 with BOM (.json)", "utf32.json", json.dumps([rec(11)]).encode("utf-32")),
        ("UTF-8 with BOM (.csv)", "bom.csv", "\ufeffsubject,prompt,target_new\n"
         "Person 12,Person 12 works in the city of,Town12\n".encode("utf-8")),
        ("UTF-16 without a BOM", "nobom16.jsonl", jsonl(rec(13)).decode().encode("utf-16-le")),
        ("Latin-1 bytes", "latin1.jsonl", jsonl(rec(14)).replace(b"Town14", "Zürich".encode("latin-1"))),
        ("malformed JSON line", "malformed.jsonl", text.encode() + b'{"subject": "Person 15", \n'),
        ("truncated JSON array", "truncated.json", json.dumps([rec(16), rec(17)])[:-20].encode()),
        ("array of non-objects", "numbers.json", b"[1, 2, 3]"),
        ("empty file", "empty.jsonl", b""),
        ("binary garbage", "garbage.bin", os.urandom(512)),
        ("corrupt Parquet", "corrupt.parquet", parquet_bad),
        ("CSV row with too many cells", "cells.csv",
         b"subject,prompt,target_new\nPerson 18,Person 18 works in the city of,Town18,extra\n"),
        ("missing required field", "missing.jsonl", jsonl({k: v for k, v in rec(19).items() if k != "target_new"})),
        ("wrong type (target_new a list)", "wrongtype.jsonl", jsonl(rec(20, target_new=["a", "b"]))),
        ("whitespace-only prompt", "blank.jsonl", jsonl(rec(21, prompt="   "))),
        ("string over 2,000 characters", "longstring.jsonl", jsonl(rec(22, target_new="y" * 2001))),
        ("fact_id path traversal", "traversal.jsonl", jsonl(rec(23, fact_id="../../../../etc/passwd"))),
        ("fact_id shell injection", "shell.jsonl", jsonl(rec(24, fact_id="$(touch pwned); `id`"))),
        ("prompt without its subject", "nosubject.jsonl",
         jsonl(rec(25, subject="Zed", prompt="The capital of France is"))),
        ("U+202E right-to-left override", "rlo.jsonl", jsonl(rec(26, target_new="Town\u202e62"))),
        ("U+200B zero-width space", "zwsp.jsonl", jsonl(rec(27, target_new="Town\u200b27"))),
        ("BEL control character", "bel.jsonl", jsonl(rec(28, target_new="Town\x0728"))),
        ("unknown op", "op.jsonl", jsonl(rec(29, op="delete"))),
        ("bad observed_at", "ts.jsonl", jsonl(rec(30, observed_at="yesterday"))),
        ("no-op update (target_new = target_old)", "noop.jsonl", jsonl(rec(31, target_old="town31 "))),
        ("duplicate records in one file", "dupes.jsonl", jsonl(rec(32), rec(32), rec(32))),
        ("a file already ingested", "good-again.jsonl", good),
        ("retract of an unknown fact", "retract.jsonl", jsonl({"op": "retract", "fact_id": "f-unknown"})),
    ]


def bench_params(tmp: Path, tiny: str | None = None) -> Path:
    from editing.config import merge, read_yaml
    from tasks.pipeline.gate import open_thresholds

    over: dict = {"ingest": LIMITS}
    if tiny:
        over.update({
            "model": {"name": tiny, "dtype": "float32"},
            "edit": {"layers": [2], "steps": 5, "batch_size": 16, "early_stop": {"check_every": 5},
                     "baft": {"gate_layer": 1, "prefixes": 1, "prefix_tokens": 3, "subject_swaps": 1}},
            "eval": {"fluency_tokens": 0},
            "gate": {**open_thresholds().thresholds(), "probes": {"standing_size": 3, "standing_tokens": 4,
                                                     "subject_probes": 2, "subject_tokens": 4,
                                                     "strict_facts": 4, "strict_tokens": 4}},
            "pipeline": {"log_pyfunc": False, "lock_timeout_s": 1800}})
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(merge(read_yaml(ROOT / "params.yaml"), over)), encoding="utf-8")
    return path


def run_inputs(tmp: Path) -> list[dict]:
    import polars as pl

    from tasks.stream.ingest import ingest, read_journal
    from tasks.stream.sources import submit
    from tasks.stream.workspace import init_workspace

    os.environ["LEDIT_PARAMS"] = str(bench_params(tmp))
    home = init_workspace(tmp / "inputs-home")
    src = tmp / "inputs-src"
    src.mkdir()
    rows = []
    for n, (kind, name, data) in enumerate(input_classes()):
        path = src / f"{n:02d}-{name}"
        path.write_bytes(data)
        submit([path], home)
        row = {"class": kind, "file": name, "bytes": len(data)}
        try:
            r = ingest(home)
            row.update(records_in=r.records_in, accepted=r.accepted, duplicates=r.duplicates,
                       quarantined=r.quarantined,
                       skipped_files=len(r.files_skipped))
            reasons = []
            for q in r.quarantine:
                q = pl.read_ndjson(q)
                shown = pl.when(q["field"].is_null()).then(q["reason"]).otherwise(q["field"] + ": " + q["reason"])
                reasons += q.select(shown.alias("r"))["r"].unique(maintain_order=True).to_list()
            row["reason"] = "; ".join(reasons) or (r.files_skipped[0]["reason"] if r.files_skipped else "")
            row["error"] = ""
        except Exception as exc:   # the finding this bench exists for: record it, go on
            row.update(records_in=None, accepted=None, duplicates=None, quarantined=None,
                       skipped_files=None, reason="", error=f"{type(exc).__name__}: {exc}"[:300])
        row["journal_clear"] = read_journal(home) is None
        rows.append(row)
    # the stream after all of them: a fresh good file still goes through
    path = src / "zz-after.jsonl"
    path.write_bytes(jsonl(rec(900), rec(901)))
    submit([path], home)
    try:
        r = ingest(home)
        after = {"class": "a good file after all of the above", "file": path.name,
                 "bytes": path.stat().st_size, "records_in": r.records_in, "accepted": r.accepted,
                 "duplicates": r.duplicates, "quarantined": r.quarantined, "skipped_files": 0,
                 "reason": "", "error": ""}
    except Exception as exc:
        after = {"class": "a good file after all of the above", "file": path.name, "bytes": 0,
                 "error": f"{type(exc).__name__}: {exc}"[:300]}
    after["journal_clear"] = read_journal(home) is None
    rows.append(after)
    os.environ.pop("LEDIT_PARAMS", None)
    return rows


def inputs_table(rows: list[dict]) -> str:
    out = ["| input class | in | accepted | dup | quarantined | journal clear | reason or error |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        why = (r.get("error") and f"**{r['error']}**") or r.get("reason") or ""
        why = why.replace("|", "\\|").replace("\n", " ")
        if len(why) > 160:
            why = why[:157] + "..."
        out.append(f"| {r['class']} | {_n(r.get('records_in'))} | {_n(r.get('accepted'))} | "
                   f"{_n(r.get('duplicates'))} | {_n(r.get('quarantined'))} | "
                   f"{'yes' if r['journal_clear'] else '**no**'} | {why} |")
    ok = all(r["journal_clear"] and not r.get("error") for r in rows)
    total = {k: sum(r.get(k) or 0 for r in rows) for k in ("records_in", "accepted", "duplicates", "quarantined")}
    out.append("")
    out.append(f"Every class ingested without an error and left the journal clear: "
               f"**{'yes' if ok else 'no'}**. Records in {total['records_in']} = accepted "
               f"{total['accepted']} + duplicates {total['duplicates']} + quarantined "
               f"{total['quarantined']} ({'adds up' if total['records_in'] == total['accepted'] + total['duplicates'] + total['quarantined'] else 'DOES NOT ADD UP'}).")
    return "\n".join(out)


def _n(v) -> str:
    return "-" if v is None else f"{v:,}"



# -- faults: the harness ------------------------------------------------------------------------
class Site:
    """One LEDIT_HOME with a tiny model and its params, driven through the real CLI."""

    def __init__(self, tmp: Path, name: str):
        from tasks.stream.workspace import init_workspace

        self.tmp = tmp / name
        self.tmp.mkdir(parents=True)
        self.home = init_workspace(self.tmp / "home")
        self.params_path = bench_params(self.tmp, tiny_model(tmp))
        self.params = yaml.safe_load(self.params_path.read_text(encoding="utf-8"))
        self.fed: list[str] = []           # fact ids accepted so far
        self.n = 0

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(OFFLINE_ENV, LEDIT_PARAMS=str(self.params_path), PYTHONPATH=str(ROOT), **extra)
        return env

    def facts_file(self, k: int = 1) -> Path:
        from editing.facts import Fact

        records = []
        for _ in range(k):
            self.n += 1
            records.append(rec(self.n))
            self.fed.append(Fact(**records[-1]).fact_id)
        path = self.tmp / f"facts-{self.n}.jsonl"
        path.write_bytes(jsonl(*records))
        return path

    def cli(self, *args, fault: str | None = None, env: dict | None = None) -> dict:
        extra = {"LEDIT_INJECT_FAULT": fault} if fault else {}
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--home", str(self.home.root),
                               "--json"], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                              env={**self.env(**extra), **(env or {})})
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            out = {}
        err = (out.get("error") or _last_error(proc.stderr)).replace(str(self.tmp.parent), "$TMP")
        return {"rc": proc.returncode, "out": out, "error": err if proc.returncode else ""}

    def state(self) -> dict:
        """Production as a reader sees it, and the invariants."""
        from tasks.stream import ledger
        from tasks.pipeline import store as pub
        from tasks.stream.ingest import read_journal
        from tasks.pipeline.batches import unprocessed_batches
        from tasks.pipeline.report import production_status
        from tasks.pipeline.state import pending_facts
        from tasks.settings import as_settings

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{self.home.root / 'mlflow.db'}"
        try:
            p = production_status(self.home, as_settings(self.params))
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        _, live_set = pub.load_production(self.home)
        live = list(live_set.fact_ids) if live_set else []
        applied = ledger.applied_edits(self.home)["fact_id"].to_list() if live else []
        accepted = ledger.scan_facts(self.home).select("fact_id").collect()["fact_id"].to_list() \
            if (self.home.state / "ledger").exists() else []
        return {"pointer": p["pointer"], "alias": p["alias"], "promotion": bool(p["promotion"]),
                "agree": p["pointer"] == p["alias"], "pending": len(pending_facts(self.home)),
                "unprocessed": len(unprocessed_batches(self.home)),
                "live": len(live), "live_once": len(live) == len(set(live)) and sorted(applied) == sorted(live),
                "all_live": sorted(set(live)) == sorted(set(self.fed)),
                "accepted_kept": set(self.fed) <= set(accepted), "journal_clear": read_journal(self.home) is None}


def _last_error(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line.split(":")[0]:
            return line.removeprefix("error:").strip()[:300]
    return (lines[-1] if lines else "")[:300]


_TINY: dict = {}


def tiny_model(tmp: Path) -> str:
    """A tiny random Llama with the embedded tokenizer, saved once per bench run."""
    if "dir" not in _TINY:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from editing.models import embedded_model_dir, prepare_tokenizer

        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(embedded_model_dir()))
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True))
        path = tmp / "tiny-llama"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        _TINY["dir"] = str(path)
    return _TINY["dir"]


INGEST_POINTS = ("after_claim", "after_stage", "after_parquet_write", "after_dvc_add", "after_commit",
                 "after_ledger", "after_push")
RUN_POINTS = ("during_training", "after_training", "during_evaluation", "after_evaluation",
              "after_mlflow_log", "after_register", "after_pointer", "after_publish")


def run_kills(tmp: Path) -> list[dict]:
    from tasks.stream.ingest import read_journal
    from tasks.stream.sources import submit

    rows = []
    site = Site(tmp, "kills")
    first = site.cli("run", "--facts", str(site.facts_file()))
    rows.append({"stage": "-", "point": "(baseline run)", "killed_rc": "-", **_after(site, first)})
    for point in INGEST_POINTS:
        submit([site.facts_file(2)], site.home)
        killed = site.cli("ingest", fault=f"{point}:kill")
        journal = read_journal(site.home)
        after = site.cli("ingest")
        row = {"stage": "ingest", "point": point, "killed_rc": killed["rc"], **_after(site, after),
               "seen_after_kill": f"journal at '{journal['phase']}'" if journal else "no journal"}
        row["next"] = (f"ingest ok, {after['out'].get('accepted')} accepted"
                       if after["rc"] == 0 else f"FAILED: {after['error']}")
        rows.append(row)
    for point in RUN_POINTS:
        killed = site.cli("run", "--facts", str(site.facts_file()), fault=f"{point}:kill")
        seen = site.state()
        after = site.cli("run")
        row = {"stage": "run", "point": point, "killed_rc": killed["rc"], **_after(site, after)}
        row["seen_after_kill"] = (f"pointer {seen['pointer']}, alias {seen['alias']}"
                                  + (", promotion in flight" if seen["promotion"] else ""))
        rows.append(row)
    return rows


def _after(site: Site, result: dict) -> dict:
    st = site.state()
    nxt = (f"{result['out'].get('status')} {result['out'].get('version') or ''}".strip()
           if result["rc"] == 0 else f"FAILED: {result['error']}")
    return {"next": nxt, "fed": len(set(site.fed)), **st}


def kills_table(rows: list[dict]) -> str:
    out = ["| stage | fault point (SIGKILL) | killed rc | seen right after the kill | next run | "
           "pointer / alias | every accepted fact live, once | journal clear |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["stage"] == "ingest":      # nothing trained yet: accepted means in the facts ledger
            inv = "accepted: yes" if r["accepted_kept"] else "**accepted: no**"
        else:
            inv = "yes" if (r["all_live"] and r["live_once"] and r["accepted_kept"]) else \
                f"**no** (live {r['live']} of {r['fed']})"
        out.append(f"| {r['stage']} | {r['point']} | {r['killed_rc']} | {r.get('seen_after_kill', '')} | "
                   f"{r['next']} | {r['pointer']} / {r['alias']}{'' if r['agree'] else ' **differ**'} | "
                   f"{inv} | {'yes' if r['journal_clear'] else '**no**'} |")
    return "\n".join(out)


# -- unavailable infrastructure --------------------------------------------------------------------
@contextmanager
def sqlite_locked(path: Path):
    """Hold an exclusive lock on a SQLite database, as a long writer elsewhere would."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        con.execute("ROLLBACK")
        con.close()


def run_infra(tmp: Path) -> list[dict]:
    from tasks.stream.workspace import init_workspace

    site = Site(tmp, "infra")
    rows = []
    base = site.cli("run", "--facts", str(site.facts_file()))
    rows.append({"fault": "(baseline run)", "failed_run": "-", **_after(site, base)})

    def case(name: str, failing, env: dict | None = None, fault: str | None = None, undo=None):
        before = site.state()
        failed = failing(env, fault)
        during = site.state()
        if undo:
            undo()
        after = site.cli("run")
        row = {"fault": name, "failed_run": (f"rc {failed['rc']}: {failed['error']}" if failed["rc"]
                                             else f"**rc 0**: {failed['out'].get('status')}"),
               "production_unchanged": (during["pointer"], during["alias"]) == (before["pointer"], before["alias"]),
               "waiting": (f"{during['unprocessed']} batch(es) unprocessed, {during['pending']} pending"
                           + ("" if during["journal_clear"] else ", ingest journal open")),
               **_after(site, after)}
        rows.append(row)

    def run_with(env, fault):
        return site.cli("run", "--facts", str(site.facts_file()), env=env, fault=fault)

    db = site.home.root / "mlflow.db"

    def locked(env, fault):
        with sqlite_locked(db):
            return run_with(env, fault)

    case("MLflow database locked", locked)
    case("MLflow store unreachable", run_with,
         env={"MLFLOW_TRACKING_URI": f"sqlite:///{site.tmp / 'no-such-dir' / 'x' / 'mlflow.db'}"})
    blocker = site.tmp / "not-a-directory"
    blocker.write_text("a regular file where the remote's parent should be\n")
    init_workspace(site.home.root, remote=str(blocker / "remote"))
    case("DVC remote unreachable", run_with,
         undo=lambda: init_workspace(site.home.root, remote=str(site.home.default_remote)))
    case("disk full at the batch Parquet write", run_with, fault="write_batch:enospc")
    case("disk full at the adapter write", run_with, fault="write_adapter:enospc")
    return rows


def infra_table(rows: list[dict]) -> str:
    out = ["| fault | the failed run | production unchanged | its facts, waiting | next run, fault gone | "
           "pointer / alias | every accepted fact live, once |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        why = str(r["failed_run"]).replace("|", "\\|").replace("\n", " / ")
        if len(why) > 400:
            why = why[:397] + "..."
        out.append(f"| {r['fault']} | {why} | {_yes(r.get('production_unchanged', True))} | "
                   f"{r.get('waiting', '-')} | {r['next']} | "
                   f"{r['pointer']} / {r['alias']} | {_yes(r['all_live'] and r['live_once'])} |")
    return "\n".join(out)


def _yes(v) -> str:
    return "yes" if v else "**no**"


# -- load --------------------------------------------------------------------------------------------
def run_load(tmp: Path, triggers: int = 5) -> dict:
    from tasks.pipeline import store as pub

    site = Site(tmp, "load")
    files = [site.facts_file() for _ in range(triggers)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--home", str(site.home.root),
                               "--facts", str(f), "--json"], cwd=ROOT, env=site.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in files]
    outs = [p.communicate(timeout=3600) for p in procs]
    seconds = time.perf_counter() - t0
    statuses, lock_errors = [], 0
    for p, (out, err) in zip(procs, outs):
        lock_errors += ("database is locked" in err) + ("already exists" in err) + ("Timeout" in err)
        try:
            statuses.append(json.loads(out.strip().splitlines()[-1])["status"] if p.returncode == 0
                            else f"rc {p.returncode}")
        except (IndexError, json.JSONDecodeError, KeyError):
            statuses.append(f"rc {p.returncode}, no summary")
    st = site.state()
    return {"triggers": triggers, "seconds": round(seconds, 1), "statuses": statuses,
            "lock_errors": lock_errors, "versions": [r["version"] for r in pub.list_records(site.home)],
            **st}


def load_table(r: dict) -> str:
    from collections import Counter

    counts = ", ".join(f"{n} {s}" for s, n in Counter(r["statuses"]).items())
    return ("| triggers | wall time | outcomes | lock errors | versions made | live edits | "
            "each edit once | pointer / alias |\n|---|---|---|---|---|---|---|---|\n"
            f"| {r['triggers']} `ledit run` at once | {r['seconds']} s | {counts} | {r['lock_errors']} | "
            f"{', '.join(r['versions'])} | {r['live']} | {_yes(r['all_live'] and r['live_once'])} | "
            f"{r['pointer']} / {r['alias']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    sections = args.only or list(SECTIONS)
    parts = [f"# Robustness: hostile input, faults and load\n\n`python -m bench.robustness"
             f"{''.join(f' --only {s}' for s in args.only or [])}` on {platform.node()} "
             f"({os.cpu_count()} cores), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"]
    with tempfile.TemporaryDirectory(prefix="ledit-robustness-") as tmp:
        tmp = Path(tmp)
        if "inputs" in sections:
            t0 = time.perf_counter()
            rows = run_inputs(tmp)
            parts.append(f"## Input classes ({time.perf_counter() - t0:.0f} s)\n\n"
                         f"Limits: {LIMITS}.\n\n" + inputs_table(rows) + "\n")
        for name, title, fn, render in (
                ("kills", "A SIGKILL at every fault point", run_kills, kills_table),
                ("infra", "Unavailable infrastructure", run_infra, infra_table),
                ("load", "Load", run_load, load_table)):
            if name in sections:
                t0 = time.perf_counter()
                result = fn(tmp)
                parts.append(f"## {title} ({time.perf_counter() - t0:.0f} s)\n\n" + render(result) + "\n")
                print(parts[-1], flush=True)
    text = "\n".join(parts)
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

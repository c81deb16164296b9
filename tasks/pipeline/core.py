"""The steps of a pipeline run, as plain functions (no Prefect; MLflow only to move and read
the registry alias ``production``, which a promotion switches with the pointer).

    ingest ─> new batches + pending facts ─> plan ─> probe the base ─> train candidate
                                                           ─> evaluate ─> gate ├pass─> publish
                                                                               └fail─> reject (facts pending)

Steps hand each other an adapter *version* (``v7``); everything about a candidate lives in its
record (``tasks.pipeline.store``), so a step can be redone from disk after a crash and nothing large
crosses a Prefect task boundary.

State that outlives a run, in ``$LEDIT_HOME/state/pipeline.json`` (atomic writes):

- ``processed_batches``: batch tags whose facts reached a verdict (promoted or rejected). A
  batch is marked only after its verdict, so a run killed during training leaves it
  unprocessed and the next run trains it again;
- ``pending``: facts that failed the gate, each with its reason and attempts; they join the
  next run's edits. After ``pipeline.max_attempts`` rejections a fact is *parked*: still
  pending, retried only by a forced run.

A second trigger waits on ``$LEDIT_HOME/.pipeline.lock`` until the first has finished.
An edit is never doubled: publishing and marking edits applied are idempotent, and a fact
already live with the same answer is skipped when planning.

Production is named twice: by ``published/production`` and by the MLflow alias
``production``. Two stores cannot switch atomically, so a promotion or rollback is a
journaled switch (``_switch``): a record in ``state/promotion.json`` first, then the pointer,
the alias, the applied ledger and the state, then the record is removed. The pointer and the
alias may disagree only while that record names the switch; ``recover``, which the next run
and every rollback call first, finishes it. ``production_status`` shows both and the record.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.pipeline import store as pub
from tasks.faults import FAULT_ENV, InjectedFault, checkpoint  # noqa: F401 (re-exported)
from tasks.stream.workspace import Home, atomic_write_json

# after_mlflow_log and after_register are in tasks.pipeline.tasks (the MLflow tasks)
FAULT_POINTS = ("during_training", "after_training", "during_evaluation", "after_evaluation",
                "after_mlflow_log", "after_register", "after_pointer", "after_publish")
FINAL = ("promoted", "rejected", "dry-run", "abandoned")
_REPO = Path(__file__).resolve().parents[2]
_MODELS: dict = {}


class PipelineError(RuntimeError):
    """A pipeline step that cannot go on; the message says what is wrong."""


def as_home(home) -> Home:
    return home if isinstance(home, Home) else Home.at(home)


def pipeline_params(params: dict) -> dict:
    p = params.get("pipeline")
    if not isinstance(p, dict):
        raise PipelineError("params.yaml has no 'pipeline' section")
    return p


# -- state ---------------------------------------------------------------------------------
def state_path(home: Home) -> Path:
    return home.state / "pipeline.json"


def read_state(home: Home) -> dict:
    try:
        state = json.loads(state_path(home).read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = {}
    state.setdefault("processed_batches", [])
    state.setdefault("pending", {})
    return state


def write_state(home: Home, state: dict) -> None:
    atomic_write_json(state_path(home), state)


def pipeline_lock(home: Home, timeout: float = -1):
    """Serialises pipeline runs (not the same file as the ingest lock, which a run takes too)."""
    from filelock import FileLock

    home.root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(home.root / ".pipeline.lock"), timeout=timeout)


def pending_facts(home) -> list[dict]:
    """Every pending fact: fact_id, subject, prompt, target_new, op, reason, attempts, parked."""
    h = as_home(home)
    out = []
    for fid, item in sorted(read_state(h)["pending"].items()):
        f = item["fact"]
        out.append({"fact_id": fid, "op": f.get("op", "upsert"), "subject": f.get("subject"),
                    "prompt": f.get("prompt"), "target_new": f.get("target_new"),
                    "reason": item.get("reason"), "attempts": item.get("attempts", 0),
                    "parked": item.get("parked", False), "last_version": item.get("last_version"),
                    "batch": item.get("origin", {}).get("batch")})
    return out


# -- the model (one per process: loaded once, never a task input) ---------------------------
def model_for(params: dict):
    from editing import load_model

    key = (str(params["model"]["name"]), str(params["model"].get("dtype")))
    if key not in _MODELS:
        _MODELS.clear()           # one model at a time: they are large
        _MODELS[key] = load_model(params["model"]["name"], dtype=params["model"].get("dtype"))
    return _MODELS[key]


# -- 1. what to edit ------------------------------------------------------------------------
def batch_md5(home: Home, tag: str) -> str:
    meta = home.workspace / "batches" / f"{tag}.json"
    try:
        return json.loads(meta.read_text(encoding="utf-8"))["dvc_md5"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        import yaml

        from tasks.stream import version
        text = version.git(home.workspace, "show", f"{tag}:batches/{tag}.parquet.dvc").stdout
        return yaml.safe_load(text)["outs"][0]["md5"]


def unprocessed_batches(home, force: bool = False) -> list[dict]:
    """Batches not yet trained into a verdict, oldest first (``force``: at least the latest)."""
    from tasks.stream.prepare import batch_tags
    from tasks.stream.workspace import is_initialised

    h = as_home(home)
    if not is_initialised(h):
        return []
    done = set(read_state(h)["processed_batches"])
    tags = batch_tags(h)
    todo = [t for t in tags if t not in done]
    if force and not todo and tags:
        todo = tags[-1:]
    return [{"tag": t, "dvc_md5": batch_md5(h, t)} for t in todo]


def batch_edits(home, tag: str, dvc_md5: str) -> list[dict]:
    """The facts of one batch as edit items ``{"fact": {...}, "origin": {...}}``.

    Read from the workspace file when its md5 matches the DVC md5, else through DVC at the tag
    (cache or remote). The content is fixed by ``dvc_md5``, so callers may cache on it.
    """
    import hashlib

    import polars as pl

    from editing.facts import FactError, fact_from_record
    from tasks.stream.prepare import FACT_FIELDS, read_batch

    h = as_home(home)
    local = h.workspace / "batches" / f"{tag}.parquet"
    df = None
    if local.exists() and hashlib.md5(local.read_bytes()).hexdigest() == dvc_md5:
        df = pl.read_parquet(local)
    if df is None:
        with h.lock():               # DVC must not read while an ingest runs dvc add/push
            df = read_batch(h, tag)
    items = []
    for i, row in enumerate(df.iter_rows(named=True)):
        rec = {k: row[k] for k in FACT_FIELDS if row.get(k) not in (None, [])}
        origin = {"batch": tag, "dvc_md5": dvc_md5, "source_file": row.get("source_file"),
                  "source_line": row.get("source_line"), "source_sha256": row.get("source_sha256"),
                  "record_hash": row.get("record_hash"), "ingest_run": row.get("run_id"),
                  "observed_at": str(row["observed_at"]) if row.get("observed_at") else None}
        try:
            fact = fact_from_record(rec, file=f"batch {tag}", record=i)
        except FactError as exc:
            # accepted by an older rule set: one such record must not stop the batch
            items.append({"fact": {"fact_id": rec.get("fact_id") or f"{tag}#{i}"}, "origin": origin,
                          "refused": str(exc)})
            continue
        items.append({"fact": fact.to_dict(), "origin": origin})
    return items


def _same_answer(a: dict, b: dict) -> bool:
    from editing.facts import normalise
    return normalise(a.get("target_new") or "") == normalise(b.get("target_new") or "")


def _key(fact: dict) -> str | None:
    from editing.facts import fact_key
    return fact_key(fact["subject"], fact["prompt"]) if fact.get("subject") and fact.get("prompt") else None


def live_facts(home: Home, version: str | None) -> list[dict]:
    """The live facts of a version as edit items (from its record; else from its manifest)."""
    if version is None:
        return []
    try:
        return pub.read_record(home, version)["live_after"]
    except pub.PublishError:
        adapter_set = pub.load_published(home, version)
        return [{"fact": f.to_dict(), "origin": {}} for f in adapter_set.facts()]


def plan(home, params: dict, batches: list[dict], batch_items: list[list[dict]], *,
         force: bool = False, dry_run: bool = False, flow_run_id: str | None = None) -> dict:
    """Decide the run's edits and open a candidate record; ``status`` 'nothing-to-do' or 'planned'.

    Edits = pending facts (unless parked, or forced), then every unprocessed batch in order; a
    later version of a fact replaces an earlier one. Skipped, each with a reason: upserts
    already live with the same answer (unless forced), retracts of facts that are not live,
    and batch records that today's record rules refuse (a batch ingested under older rules).
    A retract of a pending fact removes it from pending.
    """
    h = as_home(home)
    cfg = pipeline_params(params)
    state = read_state(h)
    base_version = pub.production_version(h)
    live = {x["fact"]["fact_id"]: x for x in live_facts(h, base_version)}
    # the engine also matches a fact by its normalised subject and prompt
    live_key = {_key(x["fact"]): fid for fid, x in live.items() if _key(x["fact"])}
    chosen: dict[str, dict] = {}
    for fid, item in state["pending"].items():
        if item.get("parked") and not force:
            continue
        chosen[fid] = {"fact": item["fact"], "origin": item.get("origin", {}),
                       "retry": item.get("attempts", 0)}
    for items in batch_items:
        for item in items:
            chosen.pop(item["fact"]["fact_id"], None)     # keep arrival order: re-insert at end
            chosen[item["fact"]["fact_id"]] = dict(item, retry=0)
    edits, skipped, cancelled = [], [], []
    for fid, item in chosen.items():
        if item.get("refused"):
            skipped.append({"fact_id": fid, "reason": f"refused by the current record rules: {item['refused']}"})
            continue
        f = item["fact"]
        live_id = fid if fid in live else live_key.get(_key(f))
        if f.get("op") == "retract":
            if live_id:
                edits.append(item)
            elif fid in state["pending"]:
                cancelled.append(fid)
                skipped.append({"fact_id": fid, "reason": "retract of a pending fact: removed from pending"})
            else:
                skipped.append({"fact_id": fid, "reason": "retract of a fact that is not live"})
        elif live_id and _same_answer(live[live_id]["fact"], f) and not force:
            skipped.append({"fact_id": fid, "reason": f"already live in {base_version} with this answer"})
        else:
            edits.append(item)
    summary = {"batches": batches, "skipped": skipped, "cancelled": cancelled,
               "base_version": base_version}
    if not edits:
        if not dry_run and (batches or cancelled):   # nothing to train: the batches are done
            state["processed_batches"] = sorted(set(state["processed_batches"]) | {b["tag"] for b in batches})
            for fid in cancelled:
                state["pending"].pop(fid, None)
            write_state(h, state)
        return {"status": "nothing-to-do", "version": None, **summary}
    version = pub.next_version(h)
    record = {"version": version, "status": "planned", "created_at": pub.now(), "dry_run": dry_run,
              "force": force, "flow_run_id": flow_run_id, "edits": edits,
              "live_before": list(live.values()), "max_attempts": cfg.get("max_attempts", 3),
              **summary}
    pub.write_record(h, record)
    return {"status": "planned", "version": version, **summary,
            "upserts": sum(1 for e in edits if e["fact"].get("op") != "retract"),
            "retracts": sum(1 for e in edits if e["fact"].get("op") == "retract")}


# -- 2. probe the base, then train ---------------------------------------------------------------
def probe(home, params: dict, version: str) -> dict:
    """The base's answers the gate will compare with: the standing suite and the candidate's
    subject probes (``tasks.pipeline.probing``). Before training, on the unedited model."""
    from tasks.pipeline.probing import probe_base

    model, tokenizer = model_for(params)
    return probe_base(as_home(home), params, version, model, tokenizer)


def train_candidate(home, params: dict, version: str, *, progress: bool = False) -> dict:
    """Extend the production set with the candidate's edits; save it under state/candidates.

    With ``pipeline.shards > 1`` the upserts are split into shards trained in parallel through
    Ray (``tasks.pipeline.shards.train_shards``); retracted and superseded edits are removed first.
    """
    from editing import AdapterSet, Fact, edit

    h = as_home(home)
    record = pub.read_record(h, version)
    model, tokenizer = model_for(params)
    base = pub.load_published(h, record["base_version"]) if record["base_version"] else None
    facts = [Fact(**e["fact"]) for e in record["edits"]]
    meta = {"training_run": record.get("mlflow_run_id") or version,
            "data_version": ",".join(b["tag"] for b in record["batches"]) or "pending"}
    shards = int(pipeline_params(params).get("shards", 1) or 1)
    t0 = time.perf_counter()
    checkpoint("during_training")
    if shards > 1 and any(f.op != "retract" for f in facts):
        candidate = _train_sharded(model, params, base, facts, shards, meta)
    elif base is not None:
        candidate = base.extend(model, tokenizer, facts, params["edit"], progress=progress, **meta)
    else:
        candidate = edit(model, tokenizer, facts, params["edit"], progress=progress, **meta)
    seconds = time.perf_counter() - t0
    checkpoint("write_adapter")
    out = candidate.save(pub.candidate_dir(h, version))
    AdapterSet.load(out)                      # what was written reads back, checksum and all
    changes = dict(getattr(candidate, "changes", None) or {})
    changes.setdefault("added", [f.fact_id for f in facts if f.op != "retract"])
    changes.setdefault("retracted", [f.fact_id for f in facts if f.op == "retract"])
    changes.setdefault("superseded", [])
    gone = set(changes["retracted"]) | set(changes["superseded"]) | set(changes["added"])
    by_id = {e["fact"]["fact_id"]: e for e in record["edits"]}
    live_after = [x for x in record["live_before"] if x["fact"]["fact_id"] not in gone]
    live_after += [{k: v for k, v in by_id[fid].items() if k != "retry"} for fid in changes["added"]
                   if fid in by_id]
    block = candidate.blocks[-1] if candidate.blocks and changes.get("block_id") else None
    training = {"seconds": round(seconds, 3), "blocks": len(candidate.blocks),
                "live_facts": len(candidate.fact_ids), "shards": shards,
                "steps": (block.stats or {}).get("steps") if block else None,
                "final_loss": (block.stats or {}).get("final_loss") if block else None}
    pub.update_record(h, version, status="trained", changes=changes, live_after=live_after,
                      training=training, candidate_dir=str(out))
    checkpoint("after_training")
    return {"version": version, "dir": str(out), "changes": changes, "training": training}


def _train_sharded(model, params, base, facts, shards, meta):
    import tempfile

    from editing.adapters import UnknownFactError
    from tasks.pipeline.shards import train_shards

    upserts = [f for f in facts if f.op != "retract"]
    retracts = [f for f in facts if f.op == "retract"]
    current = base.copy() if base is not None else None
    superseded, retracted = [], []
    if current is not None:
        retracted = [f.fact_id for f in retracts if current.locate(f)]
        if len(retracted) != len(retracts):
            raise UnknownFactError([f.fact_id for f in retracts if not current.locate(f)])
        superseded = [current.blocks[bi].fact_ids[fi] for f in upserts for bi, fi in current.locate(f)]
        current = current.retract(retracted + superseded)
    with tempfile.TemporaryDirectory(prefix="ledit-shard-base-") as tmp:
        base_dir = current.save(Path(tmp) / "base") if current is not None and current.blocks else None
        out = train_shards(upserts, params, base_dir, params["model"]["name"], shards,
                           meta["training_run"], meta["data_version"])
    out.changes = {"added": [f.fact_id for f in upserts], "superseded": superseded,
                   "retracted": retracted, "block_id": out.blocks[-1].block_id}
    return out


# -- 3. evaluate ------------------------------------------------------------------------------
def drift_texts(params: dict) -> list[str]:
    path = Path(pipeline_params(params).get("drift_texts", "data/samples/drift-text.txt"))
    path = path if path.is_absolute() else _REPO / path
    try:
        lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise PipelineError(f"params.yaml pipeline.drift_texts: {path} does not exist") from None
    return [x for x in lines if x and not x.startswith("#")]


def evaluate_candidate(home, params: dict, version: str) -> dict:
    """New edits (reliability, generality, ...), retention of every previously live edit, the
    retracted edits, locality, drift. Returns ``{"metrics": {...}, "per_fact": [...]}``."""
    from statistics import mean

    from editing import AdapterSet, Fact
    from editing.evaluate import evaluate_facts
    from editing.metrics import perplexity
    from tasks.pipeline.probing import changes_text, strict_checks

    h = as_home(home)
    record = pub.read_record(h, version)
    candidate = AdapterSet.load(pub.candidate_dir(h, version))
    model, tokenizer = model_for(params)
    t0 = time.perf_counter()
    changes = record["changes"]
    added, gone = set(changes["added"]), set(changes["retracted"]) | set(changes["superseded"])
    by_id = {e["fact"]["fact_id"]: e for e in record["edits"]}
    new = [by_id[f] for f in changes["added"] if f in by_id]
    kept = [x for x in record["live_before"] if x["fact"]["fact_id"] not in gone | added]
    retracted = [x for x in record["live_before"] if x["fact"]["fact_id"] in set(changes["retracted"])]
    fluency = int(params.get("eval", {}).get("fluency_tokens", 0) or 0)
    rows, metrics = [], {}

    def run(items, kind, fluency_tokens=0):
        if not items:
            return None
        facts = [Fact(**x["fact"]) for x in items]
        result = evaluate_facts(model, tokenizer, facts, attach=candidate.attach, fluency_tokens=fluency_tokens)
        for item, row in zip(items, result["per_fact"]):
            f, o = item["fact"], item.get("origin", {})
            rows.append({**row, "kind": kind, "subject": f["subject"], "prompt": f["prompt"],
                         "target_new": f["target_new"], "batch": o.get("batch"),
                         "source_file": o.get("source_file"), "source_line": o.get("source_line"),
                         "version": version})
        return result["means"]

    new_means = run(new, "new", fluency)
    checkpoint("during_evaluation")            # some facts evaluated, nothing saved yet
    kept_means = run(kept, "retained")
    gone_means = run(retracted, "retracted")
    for k, v in (new_means or {}).items():
        metrics[k] = v
    metrics.setdefault("reliability", None)
    metrics.setdefault("generality", None)
    metrics["retention"] = kept_means["reliability"] if kept_means else None
    metrics["retention_generality"] = kept_means["generality"] if kept_means else None
    # a retracted edit should be gone: how often its old answer still comes out
    metrics["retracted_reliability"] = gone_means["reliability"] if gone_means else None
    loc = [r["locality"] for r in rows if r["kind"] != "retracted" and r.get("locality") is not None]
    metrics["locality"] = mean(loc) if loc else None
    strict = strict_checks(h, params, record, new, candidate, model, tokenizer)
    metrics.update(strict["metrics"])
    for row in rows:
        if row["kind"] == "new":
            row.update(strict["per_fact"].get(row["fact_id"], {}))
            changed = strict["changed"].get("subject", {}).get(row["fact_id"])
            row["changed_answers"] = changes_text(changed) if changed else None
    notes = {**_unmeasured(metrics, new, kept), **strict["notes"]}
    texts = drift_texts(params)
    base_ppl = perplexity(model, tokenizer, texts)
    handle = candidate.attach(model)
    try:
        cand_ppl = perplexity(model, tokenizer, texts)
    finally:
        handle.remove()
    metrics.update({"drift": cand_ppl / base_ppl - 1.0, "perplexity_base": base_ppl,
                    "perplexity_candidate": cand_ppl, "new_edits": len(new), "retained_edits": len(kept),
                    "retracted_edits": len(retracted), "superseded_edits": len(changes["superseded"]),
                    "live_edits": len(record.get("live_after", [])),
                    "eval_seconds": round(time.perf_counter() - t0, 3),
                    **{f"eval_seconds_{k}": v for k, v in strict["seconds"].items()}})
    evaluation = {"metrics": metrics, "per_fact": rows, "notes": notes, "changed": strict["changed"]}
    pub.update_record(h, version, status="evaluated", metrics=metrics, notes=notes)
    checkpoint("after_evaluation")
    return evaluation


def _unmeasured(metrics: dict, new: list[dict], kept: list[dict]) -> dict:
    """Why each of the facts' own metrics is None, for the gate's report."""
    why = {"reliability": "no new edits", "generality": "no new edit carries rephrased prompts",
           "retention": "no previously live edits",
           "locality": "no fact carries locality prompts (the standing suite still measures locality)"}
    if not new:
        why["generality"] = "no new edits"
    return {k: v for k, v in why.items() if metrics.get(k) is None}


# -- 4. gate ------------------------------------------------------------------------------------
def judge(home, params: dict, version: str, evaluation: dict) -> dict:
    from tasks.pipeline.gate import gate

    verdict = gate(evaluation["metrics"], [r for r in evaluation["per_fact"] if r["kind"] != "retracted"],
                   params, notes=evaluation.get("notes"))
    pub.update_record(as_home(home), version, verdict=verdict.to_dict())
    return verdict.to_dict()


# -- 5. publish or reject -------------------------------------------------------------------------
def publish(home, params: dict, version: str) -> dict:
    """Copy the candidate to ``published/<version>``, then promote it with the journaled switch:
    pointer, MLflow alias, applied ledger, state.

    Every step is idempotent, so a publish interrupted anywhere is finished by redoing it; a
    killed one is finished by ``recover`` from the promotion record."""
    h = as_home(home)
    record = pub.read_record(h, version)
    path = pub.publish_set(h, version, pub.candidate_dir(h, version))
    _switch(h, params, _begin(h, "promote", version, record.get("model_version")))
    return {"version": version, "published_dir": str(path), "status": "promoted"}


def _begin(h: Home, kind: str, version: str, model_version: str | None) -> dict:
    previous = pub.production_version(h)
    try:
        previous_mv = pub.read_record(h, previous).get("model_version") if previous else None
    except pub.PublishError:        # a set published without a record: nothing to name
        previous_mv = None
    return pub.begin_promotion(h, {"kind": kind, "version": version, "model_version": model_version,
                                   "previous": previous, "previous_model_version": previous_mv,
                                   "started_at": pub.now()})


def _switch(h: Home, params: dict, promotion: dict) -> None:
    """Carry out a recorded switch of production; idempotent, so redone from any point.

    Order: pointer, alias, then the ledger and the state, then the record goes. A crash
    between the pointer and the alias leaves them disagreeing, with the record naming it."""
    from tasks.pipeline import tracking

    version, kind = promotion["version"], promotion["kind"]
    reason = "promoted" if kind == "promote" else f"rollback from {promotion.get('previous')}"
    pub.switch_production(h, version, reason=reason)
    checkpoint("after_pointer")
    if promotion.get("model_version"):
        tracking.set_production_alias(h, params, promotion["model_version"])
    record = pub.read_record(h, version)
    if kind == "promote":
        checkpoint("after_publish")
        _settle_promoted(h, record)
    else:   # a rollback: the ledger follows production, the pending facts stay as they are
        _sync_ledger(h, live_facts(h, promotion.get("previous")), record["live_after"], version,
                     record.get("mlflow_run_id"))
    pub.end_promotion(h, promotion)


def _settle_promoted(h: Home, record: dict) -> None:
    """Mark the candidate's edits applied and its batches processed, and the record promoted."""
    version = record["version"]
    _sync_ledger(h, record["live_before"], record["live_after"], version, record.get("mlflow_run_id"))
    state = read_state(h)
    for e in record["edits"]:
        state["pending"].pop(e["fact"]["fact_id"], None)
    for fid in record.get("cancelled", []):
        state["pending"].pop(fid, None)
    state["processed_batches"] = sorted(set(state["processed_batches"]) | {b["tag"] for b in record["batches"]})
    pub.update_record(h, version, status="promoted", published_dir=str(pub.published_dir(h, version)),
                      published_at=record.get("published_at") or pub.now())
    write_state(h, state)


def _sync_ledger(h: Home, before: list[dict], after: list[dict], version: str, run: str | None) -> None:
    """The applied ledger follows production: live facts applied, removed ones retracted."""
    from tasks.stream import ledger

    live = {x["fact"]["fact_id"] for x in after}
    edits = [x["fact"] for x in after]
    edits += [{"fact_id": x["fact"]["fact_id"], "op": "retract"} for x in before
              if x["fact"]["fact_id"] not in live]
    if edits:
        ledger.mark_applied(h, edits, run=run, adapter=version)


def reject(home, params: dict, version: str, verdict: dict, *, dry_run: bool = False) -> dict:
    """Production unchanged; the candidate's facts stay pending, each with its reason."""
    from tasks.pipeline.gate import Verdict, pending_reason

    h = as_home(home)
    record = pub.read_record(h, version)
    v = Verdict.from_dict(verdict)
    status = "dry-run" if dry_run else "rejected"
    reasons = {e["fact"]["fact_id"]: pending_reason(e["fact"]["fact_id"], v, version, dry_run)
               for e in record["edits"]}
    if not dry_run:
        state = read_state(h)
        max_attempts = int(record.get("max_attempts") or 3)
        for e in record["edits"]:
            fid = e["fact"]["fact_id"]
            old = state["pending"].get(fid, {})
            attempts = old.get("attempts", 0) + 1
            state["pending"][fid] = {"fact": e["fact"], "origin": e.get("origin", {}),
                                     "reason": reasons[fid], "attempts": attempts,
                                     "parked": attempts >= max_attempts, "last_version": version,
                                     "first_pending_at": old.get("first_pending_at", pub.now())}
        for fid in record.get("cancelled", []):
            state["pending"].pop(fid, None)
        state["processed_batches"] = sorted(set(state["processed_batches"]) | {b["tag"] for b in record["batches"]})
        write_state(h, state)
    pub.update_record(h, version, status=status, pending_reasons=reasons)
    return {"version": version, "status": status, "reasons": v.reasons, "pending": reasons}


def failure_note(home, before: str | None, exc: BaseException) -> str:
    """Where production and the waiting facts stand after a failed run, read from disk only
    (never MLflow, which may be what failed); appended to the run's error."""
    import errno
    import shutil

    from tasks.stream.ingest import read_journal

    h = as_home(home)
    try:
        now, switch = pub.production_version(h), pub.read_promotion(h)
        if switch:
            where = (f"a switch of production to {switch['version']} is in flight (pointer at {now}); "
                     "the next run finishes it")
        elif now == before:
            where = f"production unchanged ({now or 'none yet'})"
        else:
            where = f"production is {now} (was {before})"
        waiting = []
        j = read_journal(h)
        if j and j["phase"] in ("claimed", "staged", "written", "added"):
            waiting.append(f"{j.get('accepted', 'the')} accepted fact(s) in ingest run {j['run_id']}, "
                           f"stopped at '{j['phase']}'")
        batches = [b["tag"] for b in unprocessed_batches(h)]
        if batches:
            waiting.append(f"{len(batches)} unprocessed batch(es) ({', '.join(batches)})")
        pending = len(read_state(h)["pending"])
        if pending:
            waiting.append(f"{pending} pending fact(s)")
        note = f"ledit: the run failed; {where}; " + (
            f"the facts stay pending for the next run: {'; '.join(waiting)}" if waiting
            else "no facts were waiting")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            note += f". Disk full: {shutil.disk_usage(h.root).free / 2**20:.0f} MiB free under {h.root}"
        return note
    except Exception as unread:
        return f"ledit: the run failed; where production and the facts stand could not be read: {unread}"


# -- recovery and rollback ------------------------------------------------------------------------
def recover(home, params: dict | None = None) -> list[dict]:
    """Settle what a killed run or rollback left open, before anything else (caller holds the
    pipeline lock):

    - a promotion record: the switch it names is finished (pointer, alias, ledger, state),
      whichever step it had reached; a recorded switch is only ever rolled forward;
    - a candidate the pointer names but not promoted (a home from before promotions were
      recorded): promoted the same way;
    - any other open candidate: abandoned (its batches are still unprocessed, so the next
      plan takes its facts again).

    ``params`` names the registered model whose alias moves (default: params.yaml).
    Returns what was settled, each with the MLflow run to close."""
    h = as_home(home)
    params = params if params is not None else _default_params()
    settled = []
    promotion = pub.read_promotion(h)
    if promotion is not None:
        _switch(h, params, promotion)
        promoted = promotion["kind"] == "promote"
        run = pub.read_record(h, promotion["version"]).get("mlflow_run_id") if promoted else None
        settled.append({"version": promotion["version"], "previous": promotion.get("previous"),
                        "status": "promoted" if promoted else "rolled-back", "mlflow_run_id": run})
    production = pub.production_version(h)
    for record in pub.list_records(h):
        if record["version"] == production and record.get("status") != "promoted":
            publish(h, params, record["version"])
            settled.append({"version": record["version"], "status": "promoted",
                            "mlflow_run_id": record.get("mlflow_run_id")})
        elif record.get("status") not in FINAL:
            pub.update_record(h, record["version"], status="abandoned",
                              abandoned_reason="the run stopped before a verdict")
            settled.append({"version": record["version"], "status": "abandoned",
                            "mlflow_run_id": record.get("mlflow_run_id")})
    return settled


def _default_params() -> dict:
    from editing import load_params
    return load_params()


def rollback(home, version: str, params: dict | None = None) -> dict:
    """Point production (pointer and alias) back at a promoted ``version`` with the journaled
    switch; the applied ledger follows. Call ``recover`` first: a different switch in flight
    is refused (``PublishError``)."""
    h = as_home(home)
    version = pub.normalise_version(version)
    record = pub.read_record(h, version)
    if record.get("status") != "promoted":
        raise PipelineError(f"{version} was never promoted (status {record.get('status')}); "
                            "only a published version can be production")
    pub.load_published(h, version)     # refuse a missing or corrupted set before switching
    promotion = _begin(h, "rollback", version, record.get("model_version"))
    _switch(h, params if params is not None else _default_params(), promotion)
    return {"version": version, "previous": promotion.get("previous"),
            "model_version": record.get("model_version"), "status": "rolled-back"}


def production_status(home, params: dict | None = None) -> dict:
    """Where production stands, for readers (takes no lock, changes nothing)::

        {"pointer": "v3", "alias": "v3", "alias_model_version": "3",
         "promotion": None, "agree": True}

    ``pointer``: the version ``published/production`` names; ``alias``: the version whose
    registry version the MLflow alias ``production`` names (None: no alias yet;
    ``alias_error`` says why when MLflow could not be read); ``promotion``: the switch in
    flight (``state/promotion.json``) or None. The two stores cannot switch atomically: they
    disagree only while ``promotion`` names the switch, until the next run or rollback
    finishes it; a disagreement without a record means someone moved one by hand. Without
    the lock, a read that spans a whole switch may still mix old and new: read again."""
    from mlflow.exceptions import MlflowException

    from tasks.pipeline import tracking

    h = as_home(home)
    params = params if params is not None else _default_params()
    before = pub.read_promotion(h)       # read around both stores: a switch begun or ended
    out = {"pointer": pub.production_version(h), "alias": None, "alias_model_version": None}
    try:
        mv = tracking.client(h).get_model_version_by_alias(tracking.registered_model_name(params),
                                                           tracking.PRODUCTION_ALIAS)
    except MlflowException as exc:
        # no registered model yet, or no alias on it (MLflow says INVALID_PARAMETER_VALUE)
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(exc):
            out["alias_error"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:        # an unreachable tracking server should not hide the pointer
        out["alias_error"] = f"{type(exc).__name__}: {exc}"
    else:
        out["alias_model_version"] = str(mv.version)
        out["alias"] = (mv.tags or {}).get("ledit.version") or next(
            (r["version"] for r in pub.list_records(h) if r.get("model_version") == str(mv.version)), None)
    out["promotion"] = before or pub.read_promotion(h)    # meanwhile still counts as in flight
    out["agree"] = "alias_error" not in out and out["pointer"] == out["alias"]
    return out


def production_summary(home) -> dict:
    h = as_home(home)
    version = pub.production_version(h)
    if version is None:
        return {"version": None}
    record = pub.read_record(h, version)
    return {"version": version, "dir": str(pub.published_dir(h, version)),
            "live_edits": len(record.get("live_after", [])), "model_version": record.get("model_version"),
            "mlflow_run_id": record.get("mlflow_run_id"), "metrics": record.get("metrics")}

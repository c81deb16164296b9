"""Lifelong editing: T edits applied in sequential nightly batches, each batch a new
block trained on top of the set so far (BaFT; ReFT and LoRA applied the same way).

    .venv/bin/python -m bench.lifelong                                   # T = 10 and 100, both datasets
    .venv/bin/python -m bench.lifelong --datasets zsre --T 1000 --batch-size 100   # on a GPU
    .venv/bin/python -m bench.lifelong --overhead-only --overhead-edits 1000
    .venv/bin/python -m bench.lifelong --overhead-only --overhead-edits 0 --overhead-sets SAVED_SET_DIR

Long runs in parts (one run per checkpoint directory; run the same command again to go on):

    .venv/bin/python -m bench.lifelong --datasets counterfact --T 10000 --batch-size 100 --methods baft \\
        --milestones 1000 2000 5000 --checkpoint ck/cf-10000 --stop-after-nights 10 \\
        --overhead-edits 0 --rows bench/results/lifelong-rows.jsonl

Two protocols, both reported:
- immediate: each batch scored right after it is applied, averaged over batches;
- final (WISE): every edit scored on the final set after the last batch
  (retention of reliability and generality, and locality).

Also measured: seconds per edit, adapter bytes per edit, and the inference
overhead, the ratio of greedy generation latency with the set attached to the bare
model, interleaved in one run. Writes bench/results/lifelong.md (and a retention
plot per run) and prints the table.

Long runs:
- ``--checkpoint DIR``: after each night the set so far (``DIR/set-<night>``) and a small
  JSON state (``DIR/state.json``: the run's settings, nights done, each night's immediate
  means, training seconds and peak memory, the milestone results, the seconds spent) are
  written, each atomically; the state is written last and names the set it goes with, so a
  crash leaves the previous night's checkpoint whole. The base model's locality argmax is
  saved once (``DIR/base-locality.json``). Started again with the same DIR, a run of the same
  settings (dataset, T, batch size, method, offset, overrides, and the records, edit settings
  and base model they resolve to) goes on from the next night with the saved set as its
  base; a state of other settings stops the run with an error naming the first field that
  differs. Training is seeded, so a run in parts gives the figures of a run in one go. A
  finished run's row is kept in the state: the same command again only writes the table.
  One (dataset, T, method) per checkpoint directory.
- ``--stop-after-nights N``: end cleanly after N nights of this invocation (with
  ``--checkpoint``); the table is written only by the invocation that finishes the run.
- ``--milestones 1000 2000 5000``: when the edits applied reach a milestone, every edit so
  far is scored on the set as it is then (the final protocol on ``facts[:edits so far]``; a
  milestone that falls inside a night is scored after that night). Reported in the table
  "final-set quality along the way", whose last row per run is the final set.
- Per night: training seconds per edit (first, last and slowest night, and slowest over
  first: do nights get slower as the set grows?) and the process's peak resident memory
  (``ru_maxrss``; peak CUDA memory allocated when on a GPU), in the table "cost along the way".
- Retention by batch age: final-set reliability and generality per batch (oldest first),
  plotted, and for runs of more than 10 batches tabulated in at most 10 age groups.
- The final set's load time (``AdapterSet.load`` of the set just saved, from the page cache).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bench.edit_quality import device_name, load_dataset, newest_rows, parse_overrides, write_atomic
from editing import AdapterSet, BaFTIntervention, edit, load_model
from editing.adapters import Block
from editing.architecture import hidden_size
from editing.evaluate import evaluate_facts, teacher_answer
from editing.metrics import answer_argmax
from editing.models import fingerprint
from tasks.settings import Settings, load_settings
from tasks.stream.workspace import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python -m bench.lifelong"
TRIO = ("reliability", "generality", "locality")

STATE_FILE = "state.json"
BASE_LOC_FILE = "base-locality.json"
STATE_VERSION = 1
SET_DIR = re.compile(r"set-\d+")
# Fields of a run's identity, in the order a mismatch is looked for and reported.
IDENTITY = ("dataset", "T", "batch", "method", "offset", "overrides", "facts", "edit", "model")


class CheckpointMismatch(ValueError):
    """A --checkpoint directory holds the state of a run with other settings."""


# -- checkpoints -------------------------------------------------------------------------------
def write_state(directory: Path, state: dict) -> None:
    """The checkpoint's commit point: the state names the set it goes with, so until this
    returns the previous state, and the set it names, are what a resumed run reads."""
    atomic_write_json(Path(directory) / STATE_FILE, state)


def read_state(directory: Path) -> dict | None:
    """The state in ``directory``, or None where there is none (a fresh run)."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointMismatch(f"{path}: unreadable checkpoint state ({exc.msg}); "
                                 "delete the directory to start the run again") from exc
    if state.get("version") != STATE_VERSION:
        raise CheckpointMismatch(f"{path}: checkpoint state version {state.get('version')!r}, "
                                 f"this bench writes {STATE_VERSION}")
    return state


def run_identity(model, facts, method: str, batch_size: int, config, run: dict | None) -> dict:
    """What a checkpoint must match to be continued: the run's settings as given (``run``:
    dataset, offset, overrides), and what they resolve to (the records, the edit settings,
    the base model), in JSON form."""
    run = run or {}
    identity = {"dataset": run.get("dataset"), "T": len(facts), "batch": batch_size, "method": method,
                "offset": run.get("offset", 0), "overrides": list(run.get("overrides") or []),
                "facts": "sha256:" + hashlib.sha256("\n".join(f.fact_id for f in facts).encode()).hexdigest()[:32],
                "edit": config.to_dict(), "model": fingerprint(model)}
    return json.loads(json.dumps(identity))


def _difference(name: str, saved, wanted):
    """The dotted name and the two values of the first place where ``saved`` and ``wanted`` differ."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for key in list(wanted) + [k for k in saved if k not in wanted]:
            if saved.get(key) != wanted.get(key):
                return _difference(f"{name}.{key}", saved.get(key), wanted.get(key))
    return name, saved, wanted


HINTS = {"facts": " (other records: another --data-dir or data file?)",
         "model": " (another base model)"}


def check_identity(saved: dict, wanted: dict, where: Path) -> None:
    """Raise CheckpointMismatch naming the first field of ``IDENTITY`` that differs."""
    for key in IDENTITY:
        if saved.get(key) != wanted.get(key):
            name, a, b = _difference(key, saved.get(key), wanted.get(key))
            raise CheckpointMismatch(
                f"--checkpoint {where} holds another run: {name} is {a!r} there and {b!r} here"
                f"{HINTS.get(key, '')}. Resume with the settings it was started with, or use another "
                "checkpoint directory; runs are never mixed.")


def open_checkpoint(directory: Path, identity: dict) -> dict | None:
    """The state of ``directory`` if it is this run's (None: none yet); raises
    CheckpointMismatch if it is another run's."""
    state = read_state(directory)
    if state is not None:
        check_identity(state["run"], identity, directory)
    return state


def _clean(directory: Path, keep: str | None) -> None:
    """Remove what an interrupted night left: sets no state names, staging leftovers."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        ours = (SET_DIR.fullmatch(p.name) and p.name != keep) or p.name.startswith(".set-") \
            or (p.name.startswith((f".{STATE_FILE}.", f".{BASE_LOC_FILE}.")) and p.name.endswith(".tmp"))
        if ours:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def commit_night(directory: Path, state: dict, current: AdapterSet, night: int) -> None:
    """Save the set of ``night`` beside the previous one, then the state that names it, then
    drop the previous set. A crash before the state is written leaves the previous state and
    its set as they were (the new set, named by no state, is removed or overwritten later)."""
    name = f"set-{night:06d}"
    current.save(directory / name)
    state["set"] = name
    write_state(directory, state)
    _clean(directory, keep=name)


def peak_memory(model) -> dict:
    """The process's peak resident memory so far (KiB, Linux ``ru_maxrss``) and, on a GPU,
    the peak CUDA memory allocated (bytes)."""
    out = {"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "peak_cuda_bytes": None}
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


# -- the run -----------------------------------------------------------------------------------
def _trio(means: dict) -> dict:
    return {k: means.get(k) for k in TRIO}


def run_sequence(model, tokenizer, facts, method, settings: Settings, batch_size, *, checkpoint: Path | None = None,
                 run: dict | None = None, stop_after_nights: int | None = None, milestones=()) -> dict | None:
    """Apply ``facts`` in nightly batches of ``batch_size``.

    Returns ``{"immediate": means per night, "nights": night records, "milestones": results
    along the way (the final set last), "final": the final protocol's result, "seconds":
    training seconds, "wall_s", "invocations", "set": the final set, "state"}``, or None
    where ``stop_after_nights`` nights of this call ended it before the last night.

    With ``checkpoint`` (a directory), each night is committed there and a call with the same
    directory goes on from the next night (``run``: dataset, offset, overrides, which with
    T, batch size, method, records, edit settings and base model must match the saved state;
    CheckpointMismatch otherwise). ``milestones``: numbers of edits at which every edit so
    far is scored on the set as it is then.
    """
    config = settings.edit.override({"method": method})
    T = len(facts)
    total = math.ceil(T / batch_size)
    loc_pairs = [(x["prompt"], teacher_answer(x)) for f in facts for x in f.locality]
    loc_end = [0]                            # loc_end[i]: locality pairs of facts[:i]
    for f in facts:
        loc_end.append(loc_end[-1] + len(f.locality))
    identity = run_identity(model, facts, method, batch_size, config, run) if checkpoint else None
    checkpoint = Path(checkpoint) if checkpoint else None
    state, current, base_loc = None, None, None
    if checkpoint:
        state = open_checkpoint(checkpoint, identity)
        _clean(checkpoint, keep=state and state.get("set"))
        if state is not None:
            current = AdapterSet.load(checkpoint / state["set"]) if state.get("set") else None
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                saved = json.loads((checkpoint / BASE_LOC_FILE).read_text(encoding="utf-8"))
                if saved.get("facts") == identity["facts"] and saved.get("model") == identity["model"]:
                    base_loc = saved["base_locality"]
            print(f"  resuming {method} from {checkpoint}: {len(state['nights'])} of {total} nights done", flush=True)
    t_mark = time.perf_counter()
    if base_loc is None:
        # The base model's argmax on every locality prompt: a function of the base model only.
        base_loc = [list(x) for x in answer_argmax(model, tokenizer, loc_pairs)]
        if checkpoint:
            atomic_write_json(checkpoint / BASE_LOC_FILE, {"facts": identity["facts"], "model": identity["model"],
                                                            "base_locality": base_loc})
    if state is None:
        state = {"version": STATE_VERSION, "run": identity, "nights_total": total, "set": None,
                 "nights": [], "milestones": [], "seconds": 0.0, "wall_s": 0.0, "invocations": 0, "row": None}
    state["invocations"] += 1

    def elapsed() -> float:
        nonlocal t_mark
        now = time.perf_counter()
        spent, t_mark = now - t_mark, now
        return spent

    wanted = sorted({m for m in milestones if 0 < m < T})
    nights_here = 0
    while True:
        done = min(len(state["nights"]) * batch_size, T)
        scored = {r["milestone"] for r in state["milestones"]}
        due = [m for m in wanted if m <= done < T and m not in scored]   # at T: the final row
        if due:
            t0 = time.perf_counter()
            result = evaluate_facts(model, tokenizer, facts[:done], attach=current.attach,
                                    base_locality=base_loc[:loc_end[done]])
            took = time.perf_counter() - t0
            for m in due:
                state["milestones"].append({"milestone": m, "edits": done, **_trio(result["means"]),
                                            "eval_s": took})
            print(f"  {method} milestone {done} edits: " + _format(result["means"]), flush=True)
            if checkpoint:
                state["wall_s"] += elapsed()
                write_state(checkpoint, state)
        if len(state["nights"]) >= total:
            break
        if stop_after_nights is not None and nights_here >= stop_after_nights:
            if checkpoint:
                state["wall_s"] += elapsed()
                write_state(checkpoint, state)
            print(f"  {method}: stopped after {nights_here} nights of this run "
                  f"({len(state['nights'])} of {total} done)", flush=True)
            return None
        night = len(state["nights"]) + 1
        start = (night - 1) * batch_size
        batch = facts[start:start + batch_size]
        t0 = time.perf_counter()
        current = edit(model, tokenizer, batch, config, base=current, progress=False, training_run=f"night-{night}")
        train_s = time.perf_counter() - t0
        result = evaluate_facts(model, tokenizer, batch, attach=current.attach,
                                base_locality=base_loc[loc_end[start]:loc_end[start + len(batch)]])
        eval_s = time.perf_counter() - t0 - train_s
        record = {"night": night, "edits": start + len(batch), "immediate": _trio(result["means"]),
                  "train_s": train_s, "s_per_edit": train_s / len(batch), "eval_s": eval_s, **peak_memory(model)}
        state["nights"].append(record)
        state["seconds"] += train_s
        print(f"  {method} batch {night}: " + _format(result["means"]) + f" ({record['s_per_edit']:.2f} s per edit)",
              flush=True)
        nights_here += 1
        if checkpoint:
            state["wall_s"] += elapsed()
            commit_night(checkpoint, state, current, night)
    final = evaluate_facts(model, tokenizer, facts, attach=current.attach, base_locality=base_loc)
    state["wall_s"] += elapsed()
    along = sorted(state["milestones"], key=lambda r: r["milestone"])
    along = list({r["edits"]: r for r in along}.values())     # milestones scored in one night: one row
    along.append({"milestone": T, "edits": T, **_trio(final["means"])})
    return {"immediate": [n["immediate"] for n in state["nights"]], "nights": state["nights"],
            "milestones": along, "final": final, "seconds": state["seconds"], "wall_s": state["wall_s"],
            "invocations": state["invocations"], "set": current, "state": state}


def _format(means: dict) -> str:
    return " ".join(f"{k} {means[k]:.3f}" for k in TRIO if means.get(k) is not None)


def by_batch(per_fact: list[dict], key: str, batch_size: int) -> list | None:
    """The mean of ``key`` over each batch's facts on the final set, oldest batch first
    (None for a batch without a figure; None in all: the dataset has none)."""
    out = []
    for i in range(0, len(per_fact), batch_size):
        values = [r[key] for r in per_fact[i:i + batch_size] if r.get(key) is not None]
        out.append(statistics.mean(values) if values else None)
    return out if any(v is not None for v in out) else None


def age_groups(n_batches: int, groups: int = 10) -> list[tuple[int, int]]:
    """``n_batches`` batches (oldest first) in at most ``groups`` contiguous groups of
    near-equal size: [(first, end)) index ranges."""
    g = min(groups, n_batches)
    bounds = [round(i * n_batches / g) for i in range(g + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(g)]


@torch.no_grad()
def overhead_ratio(model, tokenizer, adapter_set, prompts, new_tokens=32, rounds=5, batch=1) -> dict:
    """Greedy generation latency with the set attached over the bare model, interleaved;
    ``batch`` prompts at a time (1: one at a time, as a served request).

    Every prompt generates exactly ``new_tokens`` tokens both ways: an edit that
    changes where the text ends would otherwise change the work being timed.
    """
    device = next(model.parameters()).device
    encoded = [tokenizer(prompts[i:i + batch], return_tensors="pt", padding=True).to(device)
               for i in range(0, len(prompts), batch)]

    def timed(attached):
        with adapter_set.attach(model) if attached else nullcontext():
            t0 = time.perf_counter()
            for enc in encoded:
                model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=tokenizer.pad_token_id)
            return time.perf_counter() - t0
    timed(False), timed(True)   # warm-up
    bare, edited = [], []
    for _ in range(rounds):
        bare.append(timed(False))
        edited.append(timed(True))
    b, e = statistics.median(bare), statistics.median(edited)
    tokens = new_tokens * len(prompts)
    return {"bare_s": b, "edited_s": e, "ratio": e / b, "tokens": tokens, "gate_ms_per_token": 1000 * (e - b) / tokens}


def synthetic_set(model, n_edits: int, settings: Settings) -> AdapterSet:
    """A set with the shapes of ``n_edits`` trained BaFT edits (random, closed gates):
    inference cost depends on the number of bases, not on what they learned."""
    cfg = settings.edit.baft
    rank = n_edits * cfg.bases_per_edit
    out = AdapterSet.for_model(model, "baft")
    block = Block(fact_ids=[f"synthetic-{i}" for i in range(n_edits)],
                  owner=torch.arange(n_edits).repeat_interleave(cfg.bases_per_edit))
    width = hidden_size(model)
    for L in settings.edit.layers:
        iv = BaFTIntervention(width, rank, True, cfg.sharpness, cfg.threshold, cfg.gate_layer)
        iv.init_keys(torch.randn(rank, width))
        block.interventions[L] = iv.requires_grad_(False)
    out.add_block(block)
    return out


def plot_retention(rows_by_batch: dict, path: Path, title: str, generality: dict | None = None) -> None:
    """Final-set reliability by batch age, one line per label; ``generality`` (the same
    labels) dashed in the same colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    many = max(len(s) for s in rows_by_batch.values()) > 30
    for method, series in rows_by_batch.items():
        line, = ax.plot(range(1, len(series) + 1), series, marker=None if many else "o", label=method)
        gen = (generality or {}).get(method)
        if gen:
            ax.plot(range(1, len(gen) + 1), [math.nan if v is None else v for v in gen], linestyle="--",
                    marker=None if many else "x", color=line.get_color(), label="_nolegend_")
    ax.set_xlabel("batch (1 = oldest)")
    ax.set_ylabel("reliability (solid), generality (dashed)\non the final set" if generality
                  else "reliability on the final set")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_rows(path: Path) -> list[dict]:
    """The newest row per (dataset, T, batch, method, overrides), sorted by those fields.
    Rows written before overrides were recorded ran on the defaults."""
    order = {"baft": 0, "reft": 1, "lora": 2}
    rows = [{"overrides": "", **r} for r in newest_rows(path, ("dataset", "T", "batch", "method", "overrides"))]
    return sorted(rows, key=lambda r: (r["dataset"], r["T"], r["batch"], order.get(r["method"], 9), r["overrides"]))


def plot_all(rows: list[dict], out: Path) -> list[str]:
    """One retention plot per (dataset, T) from the rows that carry their series,
    beside ``out`` and named after it (lifelong.md: lifelong-<dataset>-T<T>.png);
    reliability solid, generality (rows that have it) dashed."""
    groups: dict = {}
    for r in rows:
        if r.get("retention"):
            label = f"{r['method']} ({r['batch']}/batch{', ' + r['overrides'] if r['overrides'] else ''})"
            rel, gen = groups.setdefault((r["dataset"], r["T"]), ({}, {}))
            rel[label] = r["retention"]
            if r.get("retention_gen"):
                gen[label] = r["retention_gen"]
    names = []
    for (dataset, T), (series, gen) in groups.items():
        path = out.parent / f"{out.stem}-{dataset}-T{T}.png"
        plot_retention(series, path, f"{dataset}, T={T}: retention by batch age", gen or None)
        names.append(path.name)
    return names


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["zsre", "counterfact"])
    ap.add_argument("--T", nargs="+", type=int, default=[10, 100], help="total edits per run")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="edits per nightly batch (default: T/10, so ten nights)")
    ap.add_argument("--methods", nargs="+", default=["baft", "reft", "lora"])
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    ap.add_argument("--overhead-edits", type=int, default=1000,
                    help="also time generation with a set of this many edits' shapes (0: skip)")
    ap.add_argument("--overhead-only", action="store_true", help="run no edits, only the overhead timings")
    ap.add_argument("--overhead-sets", nargs="+", type=Path, default=[], metavar="DIR",
                    help="also time generation with these saved adapter sets (e.g. from --save-sets)")
    ap.add_argument("--overhead-rounds", type=int, default=5, help="timed rounds per overhead ratio (0: skip)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lifelong.md")
    ap.add_argument("--rows", type=Path, default=None,
                    help="also append each result row to this JSONL file (kept across runs)")
    ap.add_argument("--render-only", action="store_true",
                    help="write the table from the rows in --rows without running anything")
    ap.add_argument("--note", action="append", default=[], help="a line to add under the table")
    ap.add_argument("--save-sets", type=Path, default=None,
                    help="also save each final adapter set to DIR/<dataset>-T<T>-<method>")
    ap.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                    help="resumable run: after each night write the set so far and the run's state to DIR "
                         "(atomically); started again with the same DIR and settings, the run goes on from "
                         "the next night; a state of other settings is refused, naming the field. "
                         "One dataset, T and method per DIR")
    ap.add_argument("--stop-after-nights", type=int, default=None, metavar="N",
                    help="with --checkpoint: end cleanly after N nights of this invocation (run the same "
                         "command again to go on); the table is written when the run completes")
    ap.add_argument("--milestones", nargs="+", type=int, default=[], metavar="EDITS",
                    help="also score every edit so far on the set as it is when this many edits have been "
                         "applied (after the night that reaches it), e.g. 1000 2000 5000; the table "
                         "'final-set quality along the way' (default: none; the final T is always a row)")
    return ap


PROBE_PROMPTS = ["The capital of France is", "My favourite book is", "The river Nile flows"]


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if args.render_only:
        rows = read_rows(args.rows)
        plot_all(rows, args.out)
        table = render(rows, None, args, load_settings(), args.note)
        write_atomic(args.out, table)
        print(table)
        return
    if args.stop_after_nights is not None and not args.checkpoint:
        ap.error("--stop-after-nights needs --checkpoint (the nights done would be lost)")
    if args.stop_after_nights is not None and args.stop_after_nights < 1:
        ap.error("--stop-after-nights must be at least 1")
    if args.checkpoint and not args.overhead_only and len(args.datasets) * len(args.T) * len(args.methods) > 1:
        ap.error("--checkpoint holds one run: give one --datasets, one --T and one --methods")
    if any(m < 1 for m in args.milestones):
        ap.error("--milestones are numbers of edits, at least 1")

    settings = load_settings(overrides=parse_overrides(args.overrides))
    model, tokenizer = load_model(settings.model)
    rows, notes = [], []
    for dataset in [] if args.overhead_only else args.datasets:
        all_facts = load_dataset(dataset, args.data_dir)[args.offset:]
        for T in args.T:
            facts = all_facts[:T]
            if len(facts) < T:
                notes.append(f"{dataset}: only {len(facts)} usable records from offset {args.offset}; T={T} not run")
                continue
            batch_size = args.batch_size or max(1, T // 10)
            beyond = [m for m in args.milestones if m > T]
            if beyond:
                notes.append(f"{dataset} T={T}: milestones {', '.join(map(str, beyond))} beyond T, not scored")
            for method in args.methods:
                try:
                    row = run_method(model, tokenizer, facts, dataset, method, batch_size, settings, args)
                except CheckpointMismatch as exc:
                    sys.exit(f"error: {exc}")
                if row is None:        # --stop-after-nights: the run goes on next time
                    print(f"checkpoint written to {args.checkpoint}; run the same command again to go on",
                          flush=True)
                    return
                rows.append(row)
            # Plotted from the rows file when there is one, so that methods run
            # separately share one plot.
            plotted = [r for r in read_rows(args.rows) if (r["dataset"], r["T"]) == (dataset, T)] \
                if args.rows else [r for r in rows if (r["dataset"], r["T"]) == (dataset, T)]
            notes.extend(f"retention plot: `{name}`" for name in plot_all(plotted, args.out))
    table = render(rows, overheads(model, tokenizer, settings, args), args, settings, notes + args.note)
    write_atomic(args.out, table)
    print(table)


def run_method(model, tokenizer, facts, dataset, method, batch_size, settings: Settings, args) -> dict | None:
    """One method's run over ``facts`` in nightly batches: its result row, printed and kept in
    --rows; None where --stop-after-nights ended it first (the checkpoint holds the nights)."""
    T = len(facts)
    print(f"{dataset} T={T} {method} ({math.ceil(T / batch_size)} batches of {batch_size})", flush=True)
    run = {"dataset": dataset, "offset": args.offset, "overrides": args.overrides}
    if args.checkpoint:
        config = settings.edit.override({"method": method})
        state = open_checkpoint(args.checkpoint, run_identity(model, facts, method, batch_size, config, run))
        if state is not None and state.get("row"):
            print(f"  {args.checkpoint}: the run is complete; its row as recorded", flush=True)
            print(json.dumps(state["row"]), flush=True)
            return state["row"]
    seq = run_sequence(model, tokenizer, facts, method, settings, batch_size, checkpoint=args.checkpoint, run=run,
                       stop_after_nights=args.stop_after_nights, milestones=args.milestones)
    if seq is None:
        return None
    final, final_set, nights = seq["final"], seq["set"], seq["nights"]
    with tempfile.TemporaryDirectory() as tmp:
        where = args.save_sets / f"{dataset}-T{T}-{method}" if args.save_sets else Path(tmp) / "set"
        size = (final_set.save(where) / "adapter.safetensors").stat().st_size
        t0 = time.perf_counter()
        AdapterSet.load(where)
        load_s = time.perf_counter() - t0
    over = overhead_ratio(model, tokenizer, final_set, PROBE_PROMPTS, rounds=args.overhead_rounds) \
        if args.overhead_rounds else {"ratio": float("nan")}
    per_fact = final["per_fact"]
    immediate = seq["immediate"]

    def imm(k):
        values = [m[k] for m in immediate if m[k] is not None]
        return statistics.mean(values) if values else None
    cuda = [n["peak_cuda_bytes"] for n in nights if n.get("peak_cuda_bytes") is not None]
    row = {"dataset": dataset, "T": T, "batch": batch_size, "method": method,
           "overrides": " ".join(args.overrides),
           **{f"imm_{k}": imm(k) for k in TRIO},
           **{f"fin_{k}": final["means"][k] for k in TRIO},
           "s_per_edit": seq["seconds"] / T, "bytes_per_edit": size / T, "overhead": over["ratio"],
           "retention": by_batch(per_fact, "reliability", batch_size) or [],
           "retention_gen": by_batch(per_fact, "generality", batch_size),
           "milestones": [{k: r[k] for k in ("edits", *TRIO)} for r in seq["milestones"]],
           "night_s_per_edit": [n["s_per_edit"] for n in nights],
           "peak_rss_mib": max(n["peak_rss_kib"] for n in nights) / 1024,
           "peak_cuda_mib": max(cuda) / 2 ** 20 if cuda else None,
           "load_s": load_s, "wall_s": seq["wall_s"], "parts": seq["invocations"],
           "command": f"{COMMAND} " + " ".join(sys.argv[1:])}
    print(json.dumps(row), flush=True)
    if args.rows:
        with open(args.rows, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    if args.checkpoint:
        state = seq["state"]
        state["row"] = row
        write_state(args.checkpoint, state)
    return row


def overheads(model, tokenizer, settings: Settings, args) -> list[dict]:
    """Sets timed on their own: saved real sets (--overhead-sets), then the synthetic one."""
    out = []
    for where in args.overhead_sets if args.overhead_rounds else []:
        saved = AdapterSet.load(where)
        out.append({"set": str(where), "edits": len(saved.fact_ids),
                    **overhead_ratio(model, tokenizer, saved, PROBE_PROMPTS, rounds=args.overhead_rounds)})
        print(json.dumps(out[-1]), flush=True)
    if args.overhead_edits and args.overhead_rounds:
        out.append({"set": "synthetic (random keys: its gates never open)", "edits": args.overhead_edits,
                    **overhead_ratio(model, tokenizer, synthetic_set(model, args.overhead_edits, settings),
                                     PROBE_PROMPTS, rounds=args.overhead_rounds)})
        print(json.dumps(out[-1]), flush=True)
    return out


def _ratio(x: float) -> str:
    return "-" if x != x else f"{x:.3f}x"    # NaN: not measured


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None or x != x else format(x, fmt)


def retention_by_age(r: dict) -> list[dict]:
    """A row's final-set reliability and generality by batch age, in at most 10 groups of
    batches, oldest first; each group's mean weighted by its batches' edits."""
    rel, gen = r["retention"], r.get("retention_gen") or [None] * len(r["retention"])
    sizes = [min(r["batch"], r["T"] - i * r["batch"]) for i in range(len(rel))]
    out = []
    for a, b in age_groups(len(rel)):
        def mean(series):
            pairs = [(v, n) for v, n in zip(series[a:b], sizes[a:b]) if v is not None]
            return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else None
        out.append({"batches": (a + 1, b), "edits": sum(sizes[a:b]), "reliability": mean(rel), "generality": mean(gen)})
    return out


def render(rows, overheads, args, settings: Settings, notes) -> str:
    device = device_name()
    out = [f"# Lifelong editing ({time.strftime('%Y-%m-%d')})", "",
           f"Command: `{COMMAND} {' '.join(sys.argv[1:])}`  ",
           f"Model: {settings.model.name}; device: {device}; records from offset {args.offset}; "
           f"overrides: {' '.join(args.overrides) or 'none'}.", "",
           "*immediate*: each batch scored right after it was applied (mean over batches). "
           "*final*: every edit scored on the final set (the WISE protocol: retention). "
           "Overhead: greedy generation latency (exactly 32 new tokens per prompt, batch 1) with the "
           "final set attached over the bare model, interleaved in one run.", ""]
    if rows:
        out += ["| dataset | T | per batch | method | imm. rel | imm. gen | imm. loc | **final rel** | "
                "**final gen** | **final loc** | s per edit | adapter bytes per edit | inference overhead |",
                "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            out.append(f"| {r['dataset']} | {r['T']} | {r['batch']} | {_method(r)} | "
                       + " | ".join(_num(r[k]) for k in
                                    ("imm_reliability", "imm_generality", "imm_locality",
                                     "fin_reliability", "fin_generality", "fin_locality"))
                       + f" | {r['s_per_edit']:.2f} | {r['bytes_per_edit']:,.0f} | {_ratio(r['overhead'])} |")
    along = [r for r in rows if r.get("milestones")]
    if along:
        out += ["", "Final-set quality along the way: every edit applied so far scored on the set as it was "
                "then (the final protocol); the last row of each run is its final set.", "",
                "| dataset | T | per batch | method | edits so far | rel | gen | loc |",
                "|---|---:|---:|---|---:|---:|---:|---:|"]
        out += [f"| {r['dataset']} | {r['T']} | {r['batch']} | {_method(r)} | {m['edits']} | "
                + " | ".join(_num(m[k]) for k in TRIO) + " |" for r in along for m in r["milestones"]]
    costs = [r for r in rows if r.get("night_s_per_edit")]
    if costs:
        out += ["", "Cost along the way: training seconds per edit of each night (do nights get slower as the "
                "set grows?), the process's peak resident memory (`ru_maxrss`; in a process that ran several "
                "runs, the peak of all so far), peak CUDA memory allocated on a GPU, the final set's load time "
                "(`AdapterSet.load` of the set just saved), and wall time over all the invocations (parts) of the run.",
                "", "| dataset | T | per batch | method | nights | s/edit night 1 | last night | slowest night | "
                "slowest / first | peak RSS MiB | peak CUDA MiB | set load s | wall h (parts) |",
                "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in costs:
            s = r["night_s_per_edit"]
            slow = max(range(len(s)), key=s.__getitem__)
            out.append(f"| {r['dataset']} | {r['T']} | {r['batch']} | {_method(r)} | {len(s)} | {s[0]:.2f} | "
                       f"{s[-1]:.2f} | {s[slow]:.2f} (#{slow + 1}) | {s[slow] / s[0]:.2f}x | "
                       f"{_num(r.get('peak_rss_mib'), ',.0f')} | {_num(r.get('peak_cuda_mib'), ',.0f')} | "
                       f"{_num(r.get('load_s'), '.3f')} | {_num((r.get('wall_s') or 0) / 3600 or None, '.2f')} "
                       f"({r.get('parts', 1)}) |")
    aged = [r for r in rows if len(r.get("retention") or []) > 10]
    if aged:
        out += ["", "Retention by batch age: final-set reliability and generality of each group of batches "
                "(at most 10 groups, oldest first; means weighted by edits).", "",
                "| dataset | T | per batch | method | batches | edits | rel | gen |",
                "|---|---:|---:|---|---|---:|---:|---:|"]
        out += [f"| {r['dataset']} | {r['T']} | {r['batch']} | {_method(r)} | {g['batches'][0]}-{g['batches'][1]} | "
                f"{g['edits']} | {_num(g['reliability'])} | {_num(g['generality'])} |"
                for r in aged for g in retention_by_age(r)]
    if overheads:
        out += ["", "Inference overhead of adapter sets timed on their own:", "",
                "| adapter set | edits | tokens | bare s | edited s | **ratio** |", "|---|---:|---:|---:|---:|---:|"]
        out += [f"| `{o['set']}` | {o['edits']} | {o['tokens']} | {o['bare_s']:.3f} | {o['edited_s']:.3f} | "
                f"**{o['ratio']:.3f}x** |" for o in overheads]
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
    if args.render_only and commands:
        out += ["", "Rows from these runs:"] + [f"- `{c}`" for c in commands]
    out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def _method(r: dict) -> str:
    return f"{r['method']} ({r['overrides']})" if r["overrides"] else r["method"]


if __name__ == "__main__":
    main()

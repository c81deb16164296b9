"""Lifelong editing: T edits applied in sequential nightly batches, each batch a new
block trained on top of the set so far (BaFT; ReFT and LoRA applied the same way).

    .venv/bin/python -m bench.lifelong                                   # T = 10 and 100, both datasets
    .venv/bin/python -m bench.lifelong --datasets zsre --T 1000 --batch-size 100   # on a GPU
    .venv/bin/python -m bench.lifelong --overhead-only --overhead-edits 1000
    .venv/bin/python -m bench.lifelong --overhead-only --overhead-edits 0 --overhead-sets SAVED_SET_DIR

Two protocols, both reported:
- immediate: each batch scored right after it is applied, averaged over batches;
- final (WISE): every edit scored on the final set after the last batch
  (retention of reliability and generality, and locality).

Also measured: seconds per edit, adapter bytes per edit, and the inference
overhead, the ratio of greedy generation latency with the set attached to the bare
model, interleaved in one run. Writes bench/results/lifelong.md (and a retention
plot per run) and prints the table.
"""
from __future__ import annotations

import argparse
import json
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
from editing.evaluate import evaluate_facts
from editing.metrics import answer_argmax
from tasks.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python -m bench.lifelong"
TRIO = ("reliability", "generality", "locality")


def run_sequence(model, tokenizer, facts, method, settings: Settings, batch_size):
    """Apply ``facts`` in batches; returns (immediate means per batch, final result, seconds, set)."""
    config = settings.edit.override({"method": method})
    loc_pairs = [(x["prompt"], x["answer"]) for f in facts for x in f.locality]
    base_loc = answer_argmax(model, tokenizer, loc_pairs)
    offsets, n = [], 0
    for f in facts:
        offsets.append(n)
        n += len(f.locality)
    current, immediate, seconds = None, [], 0.0
    for start in range(0, len(facts), batch_size):
        batch = facts[start:start + batch_size]
        t0 = time.perf_counter()
        current = edit(model, tokenizer, batch, config, base=current, progress=False,
                       training_run=f"night-{start // batch_size + 1}")
        seconds += time.perf_counter() - t0
        loc = [base_loc[offsets[start + i] + j] for i, f in enumerate(batch) for j in range(len(f.locality))]
        result = evaluate_facts(model, tokenizer, batch, attach=current.attach, base_locality=loc)
        immediate.append(result["means"])
        print(f"  {method} batch {start // batch_size + 1}: " +
              " ".join(f"{k} {result['means'][k]:.3f}" for k in TRIO if result["means"][k] is not None),
              flush=True)
    final = evaluate_facts(model, tokenizer, facts, attach=current.attach, base_locality=base_loc)
    return immediate, final, seconds, current


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


def plot_retention(rows_by_batch: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, series in rows_by_batch.items():
        ax.plot(range(1, len(series) + 1), series, marker="o", label=method)
    ax.set_xlabel("batch (1 = oldest)")
    ax.set_ylabel("reliability on the final set")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend()
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
    beside ``out`` and named after it (lifelong.md: lifelong-<dataset>-T<T>.png)."""
    groups: dict = {}
    for r in rows:
        if r.get("retention"):
            label = f"{r['method']} ({r['batch']}/batch{', ' + r['overrides'] if r['overrides'] else ''})"
            groups.setdefault((r["dataset"], r["T"]), {})[label] = r["retention"]
    names = []
    for (dataset, T), series in groups.items():
        path = out.parent / f"{out.stem}-{dataset}-T{T}.png"
        plot_retention(series, path, f"{dataset}, T={T}: retention by batch age")
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
    return ap


PROBE_PROMPTS = ["The capital of France is", "My favourite book is", "The river Nile flows"]


def main(argv=None):
    args = parser().parse_args(argv)
    if args.render_only:
        rows = read_rows(args.rows)
        plot_all(rows, args.out)
        table = render(rows, None, args, load_settings(), args.note)
        write_atomic(args.out, table)
        print(table)
        return

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
            for method in args.methods:
                rows.append(run_method(model, tokenizer, facts, dataset, method, batch_size, settings, args))
            # Plotted from the rows file when there is one, so that methods run
            # separately share one plot.
            plotted = [r for r in read_rows(args.rows) if (r["dataset"], r["T"]) == (dataset, T)] \
                if args.rows else [r for r in rows if (r["dataset"], r["T"]) == (dataset, T)]
            notes.extend(f"retention plot: `{name}`" for name in plot_all(plotted, args.out))
    table = render(rows, overheads(model, tokenizer, settings, args), args, settings, notes + args.note)
    write_atomic(args.out, table)
    print(table)


def run_method(model, tokenizer, facts, dataset, method, batch_size, settings: Settings, args) -> dict:
    """One method's run over ``facts`` in nightly batches: its result row, printed and kept in --rows."""
    T = len(facts)
    print(f"{dataset} T={T} {method} ({T // batch_size} batches of {batch_size})", flush=True)
    immediate, final, seconds, final_set = run_sequence(model, tokenizer, facts, method, settings, batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        where = args.save_sets / f"{dataset}-T{T}-{method}" if args.save_sets else Path(tmp) / "set"
        size = (final_set.save(where) / "adapter.safetensors").stat().st_size
    over = overhead_ratio(model, tokenizer, final_set, PROBE_PROMPTS, rounds=args.overhead_rounds) \
        if args.overhead_rounds else {"ratio": float("nan")}
    per_fact = final["per_fact"]
    retention = [statistics.mean(r["reliability"] for r in per_fact[i:i + batch_size])
                 for i in range(0, T, batch_size)]
    row = {"dataset": dataset, "T": T, "batch": batch_size, "method": method,
           "overrides": " ".join(args.overrides),
           **{f"imm_{k}": statistics.mean(m[k] for m in immediate if m[k] is not None) for k in TRIO},
           **{f"fin_{k}": final["means"][k] for k in TRIO},
           "s_per_edit": seconds / T, "bytes_per_edit": size / T, "overhead": over["ratio"],
           "retention": retention, "command": f"{COMMAND} " + " ".join(sys.argv[1:])}
    print(json.dumps(row), flush=True)
    if args.rows:
        with open(args.rows, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
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
            method = f"{r['method']} ({r['overrides']})" if r["overrides"] else r["method"]
            out.append(f"| {r['dataset']} | {r['T']} | {r['batch']} | {method} | "
                       + " | ".join(f"{r[k]:.3f}" for k in
                                    ("imm_reliability", "imm_generality", "imm_locality",
                                     "fin_reliability", "fin_generality", "fin_locality"))
                       + f" | {r['s_per_edit']:.2f} | {r['bytes_per_edit']:,.0f} | {_ratio(r['overhead'])} |")
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


if __name__ == "__main__":
    main()

"""Edit quality and speed: BaFT against ReFT, LoRA (FT-L style) and the unedited model.

    .venv/bin/python -m bench.edit_quality                      # both datasets, batches 1/16/64
    .venv/bin/python -m bench.edit_quality --datasets counterfact --sizes 64

Reads ../shared/benchmarks (or --data-dir); writes a Markdown table to
bench/results/edit_quality.md and prints it. Batch size 1 runs --singles
separate one-fact edits and averages them. With --rows FILE each row is also
appended to FILE (JSON lines, with its command and device) and the table is
rendered from every row there, newest per dataset/method/batch, so a long
benchmark can run in pieces.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import mean

import torch

from editing import edit, load_model
from editing.evaluate import STRICT_METRICS, evaluate_facts, kind_keys
from editing.facts import (CONTROL_KIND, KNOWEDIT_LOCALITY, KNOWEDIT_PORTABILITY, FactError, PairSkipped,
                           read_records, records_to_facts)
from tasks.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent

FILES = {"counterfact": "counterfact-val.json", "zsre": "zsre-dev.json",
         "counterfact-train": "counterfact-train.json", "zsre-eval": "zsre-eval-dev.json",
         "knowedit-counterfact": "knowedit-wiki-counterfact-dev.json",
         "knowedit-recent": "knowedit-wiki-recent-dev.json",
         "knowedit-zsre": "knowedit-zsre-dev.json"}
SAMPLES = {"counterfact": "counterfact-sample.json", "zsre": "zsre-sample.json",
           "counterfact-train": "counterfact-sample.json", "zsre-eval": "zsre-sample.json",
           "knowedit-counterfact": "knowedit-wiki-counterfact-sample.json",
           "knowedit-recent": "knowedit-wiki-recent-sample.json",
           "knowedit-zsre": "knowedit-zsre-sample.json"}
COLUMNS = ("reliability", "generality", "locality", "exact_match", "fluency")
# Shown where a row has them: KnowEdit's portability and its per-kind scores (editing.evaluate).
EXTRA = ("portability",)
KNOWEDIT_KINDS = KNOWEDIT_LOCALITY + KNOWEDIT_PORTABILITY


def load_dataset(name: str, data_dir: Path) -> list:
    path = data_dir / FILES[name]
    if not path.exists():
        path = ROOT / "data" / "samples" / SAMPLES[name]
        print(f"note: {data_dir / FILES[name]} not found, using the bundled sample {path}")
    # Public files hold a few records the schema refuses (no-op or empty targets, invisible
    # characters in locality answers): skip them, and say how many of each kind.
    records = read_records(path)
    skipped: list[FactError] = []
    left_out: list[PairSkipped] = []
    with warnings.catch_warnings():          # one summary below instead of a line per item
        warnings.simplefilter("ignore", PairSkipped)
        facts = list(records_to_facts(records, file=str(path), skipped=skipped, skip_refused=True,
                                      skipped_pairs=left_out))
    if left_out:
        print(f"note: {len(left_out)} evaluation items left out of accepted records in {path.name}:")
        by_reason: dict[str, list[PairSkipped]] = {}
        for item in left_out:
            reason = CONTROL_KIND if item.reason.startswith("contains U+") else item.reason
            by_reason.setdefault(reason, []).append(item)
        for reason, items in by_reason.items():
            more = ", ..." if len(items) > 5 else ""
            print(f"  {len(items)} x {reason}: "
                  + ", ".join(f"record {x.record} {x.field}" for x in items[:5]) + more)
    if skipped:
        print(f"note: {len(skipped)} of {len(records)} records skipped in {path.name}:")
        by_kind: dict[str, list[FactError]] = {}
        for exc in skipped:
            by_kind.setdefault(exc.kind, []).append(exc)
        for kind, excs in by_kind.items():
            first, more = excs[0], ", ..." if len(excs) > 5 else ""
            detail = "" if first.reason == kind else f": {first.reason}"
            print(f"  {len(excs)} x {kind}: records {', '.join(str(e.record) for e in excs[:5])}"
                  f"{more} (first in field {first.field}{detail})")
    return facts


def run_one(model, tokenizer, facts, method, settings: Settings, strict_tokens=0):
    """(means, seconds per edit, adapter bytes per edit) for one training run."""
    fluency_tokens = settings.eval.fluency_tokens
    if method == "none":
        result = evaluate_facts(model, tokenizer, facts, fluency_tokens=fluency_tokens, strict_tokens=strict_tokens)
        return result["means"], 0.0, 0
    t0 = time.perf_counter()
    adapter_set = edit(model, tokenizer, facts, settings.edit.override({"method": method}), progress=False)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        size = (adapter_set.save(Path(tmp) / "set") / "adapter.safetensors").stat().st_size
    result = evaluate_facts(model, tokenizer, facts, attach=adapter_set.attach, fluency_tokens=fluency_tokens,
                            strict_tokens=strict_tokens)
    return result["means"], seconds / len(facts), size / len(facts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["counterfact", "zsre"], choices=list(FILES))
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--methods", nargs="+", default=["none", "baft", "reft", "lora"])
    ap.add_argument("--singles", type=int, default=4, help="one-fact runs averaged for batch size 1")
    ap.add_argument("--strict-tokens", type=int, default=24,
                    help="new tokens of the strict (generation, chat, repetition) metrics; 0: not measured")
    ap.add_argument("--offset", type=int, default=0, help="first record used")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    ap.add_argument("--model", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override params.yaml, e.g. --set edit.layers=[8] --set edit.baft.gate_layer=null")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "edit_quality.md")
    ap.add_argument("--rows", type=Path, default=None, help="JSON-lines file the rows are appended to and read from")
    ap.add_argument("--render-only", action="store_true", help="write the table from --rows without running")
    ap.add_argument("--note", action="append", default=[], help="a line to add under the table")
    args = ap.parse_args(argv)

    settings = load_settings(overrides=parse_overrides(args.overrides))
    if args.model:                  # one place, so the table names the model that ran
        settings = settings.override({"model": {"name": args.model}})
    if args.render_only:
        write_table(read_rows(args.rows), args, settings)
        return
    model, tokenizer = load_model(settings.model)
    rows = []
    for dataset in args.datasets:
        facts = load_dataset(dataset, args.data_dir)[args.offset:]
        for size in args.sizes:
            runs = [facts[i:i + 1] for i in range(args.singles)] if size == 1 else [facts[:size]]
            for method in args.methods:
                results = [run_one(model, tokenizer, run, method, settings, args.strict_tokens) for run in runs]
                means = row_means([r[0] for r in results])
                row = {"dataset": dataset, "method": method, "batch": size, "edits": sum(map(len, runs)),
                       **means, "s_per_edit": mean(r[1] for r in results),
                       "bytes_per_edit": mean(r[2] for r in results),
                       "command": command_line(), "device": device_name()}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.rows:
                    with open(args.rows, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
    write_table(read_rows(args.rows) if args.rows else rows, args, settings)


def row_means(results: list[dict]) -> dict:
    """The columns of one table row over its runs (several for batch size 1): each the mean of
    the runs that measured it, None where none did; extra columns only where some run has them."""
    extra = [c for c in EXTRA + STRICT_METRICS + kind_keys(results) if any(r.get(c) is not None for r in results)]
    out = {}
    for c in COLUMNS + tuple(extra):
        values = [r[c] for r in results if r.get(c) is not None]
        out[c] = mean(values) if values else None
    return out


def newest_rows(path: Path, key: tuple[str, ...]) -> list[dict]:
    """Rows of a --rows file (JSON lines), the newest per ``key`` fields, in the order last written."""
    newest = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            k = tuple(r.get(f, "") for f in key)   # a field older rows lack counts as empty
            newest.pop(k, None)
            newest[k] = r
    return list(newest.values())


def read_rows(path: Path) -> list[dict]:
    """The newest row per (dataset, method, batch), in a stable order."""
    order = {"none": 0, "baft": 1, "reft": 2, "lora": 3}
    return sorted(newest_rows(path, ("dataset", "method", "batch")),
                  key=lambda r: (r["dataset"], r["batch"], order.get(r["method"], 9)))


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one step: an interrupted benchmark leaves the old table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_table(rows, args, settings: Settings) -> None:
    table = render(rows, args, settings)
    write_atomic(args.out, table)
    print(table)


def command_line() -> str:
    return "python -m bench.edit_quality " + " ".join(sys.argv[1:])


def device_name() -> str:
    if torch.cuda.is_available():
        return "cuda: " + torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def parse_overrides(items: list[str]) -> dict:
    """["edit.baft.threshold=0.6"] -> {"edit": {"baft": {"threshold": 0.6}}} (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def render(rows, args, settings: Settings) -> str:
    commands = list(dict.fromkeys(r.get("command") or command_line() for r in rows))
    devices = list(dict.fromkeys(r.get("device") or device_name() for r in rows))
    e = settings.edit
    # KnowEdit's columns (portability, each KnowEdit kind) where a row has them; the other
    # formats have one locality kind each, which is the locality column already
    extra = [c for c in EXTRA + kind_keys(rows) if any(r.get(c) is not None for r in rows)
             and (c in EXTRA or c.split(".", 1)[1] in KNOWEDIT_KINDS)]
    head = [f"# Edit quality ({time.strftime('%Y-%m-%d')})", "",
            "Commands: " + "; ".join(f"`{c}`" for c in commands) + "  ",
            f"Model: {settings.model.name}; device: {', '.join(devices)}; records from offset {args.offset}.  ",
            f"Edit layers {list(e.layers)}, gate layer {e.baft.gate_layer}, "
            f"{e.baft.bases_per_edit} bases per edit, <= {e.steps} steps; LoRA rank "
            f"{e.lora.rank} on the MLP down-projection of the same layers.",
            f"Overrides: {' '.join(args.overrides) or 'none'}.", "",
            "| dataset | method | batch | reliability | generality | locality | exact match | fluency "
            + "".join(f"| {c} " for c in extra)
            + "| mean of rel/gen/loc | s per edit | adapter bytes per edit |",
            "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra) + "---:|---:|---:|"]
    for r in rows:
        def f(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)
        trio = [r[c] for c in ("reliability", "generality", "locality") if r[c] is not None]
        head.append(f"| {r['dataset']} | {r['method']} | {r['batch']} | {f(r['reliability'])} | "
                    f"{f(r['generality'])} | {f(r['locality'])} | {f(r['exact_match'])} | {f(r['fluency'])} | "
                    + "".join(f"{f(r.get(c))} | " for c in extra)
                    + f"{f(mean(trio))} | {f(r['s_per_edit'], '{:.2f}')} | {f(r['bytes_per_edit'], '{:,.0f}')} |")
    head += strict_table(rows)
    head += [""] + [f"- {n}" for n in args.note]
    return "\n".join(head) + "\n"


def strict_table(rows) -> list[str]:
    """What users see (editing/metrics.py; README, "Strict metrics"): greedy generation and chat success
    on the prompt and its rephrases, generation locality, and the share of continuations with a
    repeated 3-gram beside the unedited model's on the same prompts."""
    rows = [r for r in rows if any(r.get(c) is not None for c in STRICT_METRICS)]
    if not rows:
        return []
    def f(v):
        return "-" if v is None else f"{v:.3f}"
    out = ["", "Strict columns (greedy continuations; chat: through the model's chat template):", "",
           "| dataset | method | batch | generation success | ... rephrase | chat success | ... rephrase "
           "| generation locality | repetition | repetition, unedited |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['dataset']} | {r['method']} | {r['batch']} | "
                   + " | ".join(f(r.get(c)) for c in STRICT_METRICS) + " |")
    return out


if __name__ == "__main__":
    main()

"""Load on the served chat model: `mlflow models serve` on 127.0.0.1, with and without an adapter set.

    .venv/bin/python -m bench.serving                                  # 1,000 edits, 1 and 8 clients, 60 s each
    .venv/bin/python -m bench.serving --seconds 5 --edits 10 --clients 1 2 --out /tmp/serving.md

In a temporary directory, the chat model (tasks/pipeline/chat.py) is logged twice into a SQLite
MLflow store: with a synthetic set of --edits BaFT edits (bench/lifelong.py ``synthetic_set``:
the shapes of trained edits with closed gates; cost depends on the number of bases, not on what
they learned) and with an empty set, which attaches no hook (the bare base through the same
code). Each is served by ``mlflow models serve --env-manager local``; --clients closed-loop
clients (threads) send greedy chat requests back to back for --seconds. Prints and writes a
table (p50, p95, throughput, errors) and the three targets of issue 15.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.edit_quality import device_name, write_atomic
from bench.lifelong import synthetic_set
from editing import AdapterSet, load_model
from editing.offline import OFFLINE_ENV
from flows.cli.server import stop_process_groups
from tasks.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is a good way to start the morning?", "How do I boil an egg?",
    "Why is the sky blue?", "What should I pack for a weekend trip?",
    "How can I keep my houseplants alive?", "What is the difference between a cold and the flu?",
    "Can you suggest a quick vegetarian dinner?", "How many hours of sleep does an adult need?",
    "What is a simple way to save money each month?", "How do I remove a coffee stain from a shirt?",
    "What are some fun things to do on a rainy day?", "How do I write a polite email to my landlord?",
    "Why do cats purr?", "What is the best way to learn a new language?",
    "How long should I walk each day to stay healthy?", "What can I cook with rice and beans?",
    "How do I change a flat bicycle tyre?", "What makes bread rise?",
    "How can I stop procrastinating?", "What is a good book to read on holiday?",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=1000, help="edits in the synthetic adapter set")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients, one run each")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each closed-loop run")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each chat request")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.md")
    return ap.parse_args(argv)


def log_models(tmp: Path, edits: int, settings) -> tuple[str, list[tuple[str, str]]]:
    """The chat model logged twice in a temporary SQLite store: (tracking URI, [(label, model URI)])."""
    import mlflow
    from tasks.pipeline.chat import log_chat_model

    model, _ = load_model(settings.model)
    sets = [("bare", AdapterSet.for_model(model, "baft")),      # no blocks: attaches no hooks
            (f"{edits} edits", synthetic_set(model, edits, settings))]
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("serving-bench", artifact_location=(tmp / "artifacts").as_uri())
    out = []
    for i, (label, adapter_set) in enumerate(sets):
        directory = adapter_set.save(tmp / f"set-{i}")
        with mlflow.start_run(experiment_id=exp, run_name=label):
            info = log_chat_model(directory, settings.model.name, dtype=settings.model.dtype,
                                  adapter_version=label, serving=settings.serving)
        out.append((label, info.model_uri))
    return uri, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(model_uri: str, tracking_uri: str, log_path: Path, timeout_s: float = 300):
    """``mlflow models serve`` on a free port of 127.0.0.1; yields the invocations URL."""
    port = free_port()
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, **OFFLINE_ENV, PATH=path, MLFLOW_TRACKING_URI=tracking_uri)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not _ping(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
            yield f"http://127.0.0.1:{port}/invocations"
        finally:
            stop_process_groups([proc], 30)


def _ping(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def ask(url: str, prompt: str, max_tokens: int) -> tuple[bool, float]:
    """One chat request: (answered with 200 and a choice, seconds)."""
    payload = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            ok = r.status == 200 and bool(json.loads(r.read())["choices"])
    except (OSError, ValueError, KeyError, TypeError):   # HTTPError is an OSError
        ok = False
    return ok, time.perf_counter() - t0


def closed_loop(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """``clients`` threads each sending requests back to back until ``seconds`` have passed."""
    results: list[tuple[bool, float]] = []
    lock, start = threading.Lock(), time.perf_counter()
    deadline = start + seconds

    def client(k: int):
        i = k
        while time.perf_counter() < deadline:
            r = ask(url, PROMPTS[i % len(PROMPTS)], max_tokens)
            with lock:
                results.append(r)
            i += clients
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies = sorted(s for ok, s in results if ok)
    return {"clients": clients, "requests": len(results), "errors": sum(not ok for ok, _ in results),
            "throughput": len(latencies) / elapsed, "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95), "elapsed": elapsed}


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks of sorted ``values``."""
    if not values:
        return None
    pos = (len(values) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def targets(rows: list[dict], edits_label: str, clients: list[int]) -> list[str]:
    """The three targets of issue 15, at 8 clients (or the most run) against 1 (or the fewest)."""
    many, one = (8 if 8 in clients else max(clients)), (1 if 1 in clients else min(clients))
    get = {(r["set"], r["clients"]): r for r in rows}
    bare, edited, alone = get[("bare", many)], get[(edits_label, many)], get[(edits_label, one)]
    errors = sum(r["errors"] for r in rows if r["set"] == edits_label)
    p95 = edited["p95"] / bare["p95"] if edited["p95"] and bare["p95"] else None
    speedup = edited["throughput"] / alone["throughput"] if alone["throughput"] else None

    def verdict(value, ok):
        return "-" if value is None else ("met" if ok(value) else "**not met**")
    return ["| target | value | goal | verdict |", "|---|---:|---:|---|",
            f"| errors with the {edits_label} set | {errors} | 0 | {verdict(errors, lambda v: v == 0)} |",
            f"| p95 with set / p95 bare, {many} clients | {_f(p95, '{:.2f}')} | <= 1.2 | "
            f"{verdict(p95, lambda v: v <= 1.2)} |",
            f"| throughput {many} clients / {one} client, with set | {_f(speedup, '{:.2f}')} | >= 3 | "
            f"{verdict(speedup, lambda v: v >= 3)} |"]


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(rows: list[dict], args, settings, edits_label: str) -> str:
    s, b = settings.serving, settings.edit.baft
    head = [f"# Serving load ({time.strftime('%Y-%m-%d %H:%M')})", "",
            "Command: `python -m bench.serving " + " ".join(sys.argv[1:]) + "`  ",
            f"Machine: {device_name()}; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}.  ",
            f"Model: {settings.model.name} ({settings.model.dtype}); serving max_batch {s.max_batch}, "
            f"batch_wait_ms {s.batch_wait_ms}; one uvicorn worker.  ",
            f"Load: closed loop, {args.seconds:g} s per run, greedy chat requests of max_tokens "
            f"{args.max_tokens}, {len(PROMPTS)} everyday questions in turn.", "",
            "| set | clients | requests | errors | throughput (req/s) | p50 (s) | p95 (s) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head.append(f"| {r['set']} | {r['clients']} | {r['requests']} | {r['errors']} | "
                    f"{r['throughput']:.2f} | {_f(r['p50'])} | {_f(r['p95'])} |")
    head += ["", *targets(rows, edits_label, args.clients), "",
             f"- {edits_label}: `synthetic_set` (bench/lifelong.py), {b.bases_per_edit} bases per edit on "
             f"layers {list(settings.edit.layers)}, gate layer {b.gate_layer}; random keys, closed gates.",
             "- bare: the same chat model with an adapter set of zero blocks (`AdapterSet.for_model`), which "
             "attaches no hooks: the same template, batching and fired-facts pass, without bases.",
             "- Errors: non-200 answers and failed requests. Throughput and latency count answered requests; "
             "a request under way at the end of a run is finished and counted.",
             "- Clients and server share the machine."]
    return "\n".join(head) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if min(args.clients) < 1 or args.edits < 1 or args.seconds <= 0:
        raise SystemExit("--clients and --edits must be >= 1 and --seconds > 0")
    settings = load_settings()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ledit-serving-") as name:
        tmp = Path(name)
        tracking_uri, models = log_models(tmp, args.edits, settings)
        for i, (label, model_uri) in enumerate(models):
            print(f"serving {label} ({model_uri})", flush=True)
            with served(model_uri, tracking_uri, tmp / f"serve-{i}.log") as url:
                closed_loop(url, max(args.clients), min(args.seconds, 5.0), args.max_tokens)   # warm-up
                for clients in args.clients:
                    row = {"set": label, **closed_loop(url, clients, args.seconds, args.max_tokens)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    text = render(rows, args, settings, models[1][0])
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()

"""The UIs, seen as a person sees them (issue 15 part 4): one nightly run, then its pages in
headless Chromium, screenshotted and checked for what an auditor needs. Not part of the tests.

    .venv/bin/python -m bench.ui_check                           # fresh home, 4 facts, open gate
    .venv/bin/python -m bench.ui_check --facts-n 8 --gate params --keep

Starts ``ledit server`` on free ports of 127.0.0.1 with a fresh temporary LEDIT_HOME (or
--home), submits the first --facts-n facts of --facts and runs ``ledit run`` (the nightly
refresh) against both servers (PREFECT_API_URL, MLFLOW_TRACKING_URI). The ids come from the
MLflow client and the Prefect REST API. Each page is loaded twice by the chromium CLI
(``--dump-dom`` for the text, ``--screenshot`` for the PNG, saved as a 64-colour PNG under
bench/results/ui/). A check is the text the store holds (a tag, the dataset digest, an alias,
a task run's name) found in the rendered DOM; a page missing some is loaded once more with
three times the virtual time budget. Then the server is stopped the way ``ledit server`` is
(``stop_process_groups``) and both ports must be free. Prints the table and writes
bench/results/ui_check.md; the section "What a person finds unclear" of that file is written
by a person looking at the screenshots and kept when the file is rewritten.
Exit 0: every check visible; 1: a check failed or the run failed; 2: no chromium.

--gate open (the default) lays tasks.pipeline.gate.open_thresholds over params.yaml
(LEDIT_PARAMS), so the candidate is promoted and the model page has a `production` alias;
today's BaFT fails params.yaml's gate on the sample (relation specificity), and with
--gate params a rejected run's model page is checked for the rejection instead.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from editing.offline import OFFLINE_ENV
from flows.cli.server import raise_interrupt, stop_process_groups

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SAMPLE = ROOT / "data" / "samples" / "nightly-sample.jsonl"
UNCLEAR = "## What a person finds unclear"
# a fresh profile and no background traffic: nothing leaves the machine
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=None, help="LEDIT_HOME to use (default: a fresh temporary one)")
    ap.add_argument("--facts", type=Path, default=SAMPLE, help="JSONL facts file (default: %(default)s)")
    ap.add_argument("--facts-n", type=int, default=4, help="submit only its first N facts (default 4)")
    ap.add_argument("--gate", choices=["open", "params"], default="open",
                    help="open: every threshold open, so the run is promoted; params: params.yaml's gate")
    ap.add_argument("--prefect-port", type=int, default=0, help="0: a free port")
    ap.add_argument("--mlflow-port", type=int, default=0, help="0: a free port")
    ap.add_argument("--chromium", default=None, help="browser binary (default: chromium on PATH)")
    ap.add_argument("--budget-ms", type=int, default=15000, help="chromium --virtual-time-budget")
    ap.add_argument("--window", default="1600,2000", help="chromium --window-size")
    ap.add_argument("--shots", type=Path, default=RESULTS / "ui", help="where the screenshots go")
    ap.add_argument("--out", type=Path, default=RESULTS / "ui_check.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (home, logs)")
    return ap.parse_args(argv)


# -- the servers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Nothing listens and the port can be bound again (TIME_WAIT allowed, as servers do)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def ledit_command() -> list[str]:
    local = Path(sys.executable).parent / "ledit"
    return [str(local)] if local.exists() else [sys.executable, "-m", "flows.cli"]


@contextmanager
def ledit_server(home: Path, ports: dict, log_path: Path, timeout_s: float = 300):
    """``ledit server`` in its own process group until both UIs answer; yields their base URLs.
    On leaving it is stopped as the project stops it (SIGINT to the group, then SIGKILL)."""
    cmd = [*ledit_command(), "server", "--home", str(home), "--host", "127.0.0.1",
           "--prefect-port", str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"])]
    env = {**os.environ, **OFFLINE_ENV}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    prefect, mlflow = f"http://127.0.0.1:{ports['prefect']}", f"http://127.0.0.1:{ports['mlflow']}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not (answers(f"{prefect}/api/health") and answers(f"{mlflow}/health")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"ledit server did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
            yield prefect, mlflow
        finally:
            stop_process_groups([proc], 60)


# -- the pipeline run -------------------------------------------------------------------------
def facts_file(src: Path, n: int, work: Path) -> Path:
    """The first ``n`` records of ``src``, under a name that says where they came from."""
    lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()][:n]
    if not lines:
        raise SystemExit(f"{src} has no records")
    out = work / f"{src.stem}-first{len(lines)}{src.suffix}"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def open_gate_params(work: Path) -> Path:
    """params.yaml with every gate threshold open, for LEDIT_PARAMS."""
    import yaml

    from tasks.pipeline.gate import open_thresholds
    from tasks.settings import merge, read_yaml

    params = merge(read_yaml(ROOT / "params.yaml"), {"gate": open_thresholds().thresholds()})
    out = work / "params-open-gate.yaml"
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return out


def run_pipeline(home: Path, facts: Path, urls: tuple[str, str], params: Path | None, log: Path) -> dict:
    """``ledit submit`` then ``ledit run --json`` (the nightly refresh) on both servers."""
    prefect, mlflow = urls
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_API_URL": f"{prefect}/api", "MLFLOW_TRACKING_URI": mlflow}
    if params:
        env["LEDIT_PARAMS"] = str(params)
    with open(log, "w") as err:
        subprocess.run([*ledit_command(), "submit", "--home", str(home), str(facts)], cwd=ROOT, env=env,
                       check=True, stdout=err, stderr=subprocess.STDOUT)
        done = subprocess.run([*ledit_command(), "run", "--home", str(home), "--json"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=err, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    summary = json.loads(lines[-1]) if lines else {"status": "failed", "error": "no JSON line"}
    if done.returncode != 0 or summary.get("status") not in ("promoted", "rejected"):
        raise SystemExit(f"ledit run failed ({done.returncode}): {summary.get('error') or summary.get('status')}\n"
                         f"{log.read_text()[-3000:]}")
    return summary


# -- the ids and what the stores hold -----------------------------------------------------------
def mlflow_facts(mlflow_url: str, run_id: str) -> dict:
    """What the MLflow store holds for the run: experiment, tags, dataset inputs, artifacts,
    and its registry version with the version the `production` alias points at."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    cl = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    run = cl.get_run(run_id)
    datasets = [(d.dataset.name, d.dataset.digest) for d in (run.inputs.dataset_inputs or [])]
    versions = cl.search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        raise SystemExit(f"MLflow run {run_id} has no registry version")
    mv = versions[0]
    try:
        production = cl.get_model_version_by_alias(mv.name, "production").version
    except MlflowException:
        production = None
    return {"run_id": run_id, "experiment_id": run.info.experiment_id, "run_name": run.info.run_name,
            "tags": dict(run.data.tags), "metrics": sorted(run.data.metrics), "datasets": datasets,
            "artifacts": [a.path for a in cl.list_artifacts(run_id)],
            "evaluation": [a.path.split("/")[-1] for a in cl.list_artifacts(run_id, "evaluation")],
            "model": mv.name, "version": str(mv.version), "version_tags": dict(mv.tags),
            "production": None if production is None else str(production)}


def prefect_api(prefect_url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{prefect_url}/api/{path}", data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def prefect_facts(prefect_url: str, flow_run_id: str) -> dict:
    """The flow run's name, state and flow, its task runs' names and its run-summary artifact."""
    fr = prefect_api(prefect_url, f"flow_runs/{flow_run_id}")
    flow = prefect_api(prefect_url, f"flows/{fr['flow_id']}")
    by_run = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    tasks = prefect_api(prefect_url, "task_runs/filter", {**by_run, "limit": 200})
    arts = prefect_api(prefect_url, "artifacts/filter",
                       {**by_run, "artifacts": {"key": {"any_": ["ledit-run-summary"]}}})
    return {"id": flow_run_id, "name": fr["name"], "state": fr["state"]["name"], "flow": flow["name"],
            "tasks": sorted(t["name"] for t in tasks),
            "summary_artifact": arts[0]["id"] if arts else None}


# -- chromium ---------------------------------------------------------------------------------
def find_chromium(given: str | None) -> str | None:
    for name in ([given] if given else ["chromium", "/usr/bin/chromium", "chromium-browser"]):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium(binary: str, work: Path, url: str, budget_ms: int, window: str, *out: str) -> subprocess.CompletedProcess:
    """One headless load of ``url`` in a fresh profile; ``out`` is --dump-dom or --screenshot=FILE."""
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=work))
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
           f"--window-size={window}", *out, url]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120 + budget_ms / 1000)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def dom_text(dom: str) -> str:
    """What the DOM shows as text: scripts, styles and tags dropped, whitespace folded."""
    text = re.sub(r"<(script|style|noscript)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return re.sub(r"\s+", " ", text).strip()


def shrink_png(path: Path) -> None:
    """64 colours, no dithering: UI text stays sharp at a third of the size."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


# -- the pages and what each must show ------------------------------------------------------------
def fold(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def tag_shown(tags: dict, key: str, sep: str = " : ") -> str:
    return fold(f"{key}{sep}{tags[key]}")


def mlflow_run_pages(ml: dict, base: str) -> list[dict]:
    """The run's Overview (tags, dataset, verdict) and Artifacts tab (summary.md opened)."""
    tags, run = ml["tags"], f"{base}/#/experiments/{ml['experiment_id']}/runs/{ml['run_id']}"
    facts = sorted(k for k in tags if k.startswith("fact."))
    checks = [("run name and ledit.status", [ml["run_name"], tag_shown(tags, "ledit.status")]),
              ("description: the gate's table, the batches' DVC md5, the edits' sources",
               [f"Gate for {tags['ledit.version']}", "DVC md5", "source"])]
    checks += [(f"tag {k}", [tag_shown(tags, k)]) for k in facts]
    checks += [(f"dataset input {name} with its DVC md5", [fold(f"{name} ({digest})")])
               for name, digest in ml["datasets"]]
    checks += [("tags ledit.batches and ledit.dvc_md5", [tag_shown(tags, "ledit.batches"),
                                                          tag_shown(tags, "ledit.dvc_md5")]),
               ("gate verdict: tags gate and gate.reasons", [tag_shown(tags, "gate"), tag_shown(tags, "gate.reasons")]),
               (f"gate.check.* tags ({sum(k.startswith('gate.check.') for k in tags)})",
                [tag_shown(tags, k) for k in tags if k.startswith("gate.check.")]),
               ("gate.threshold.* metrics", [m for m in ml["metrics"] if m.startswith("gate.threshold.")]),
               ("tag prefect.flow_run_id", [tag_shown(tags, "prefect.flow_run_id")]),
               ("registered model link", [ml["model"]])]
    arts = [("artifact folders: " + ", ".join(ml["artifacts"]), ml["artifacts"]),
            ("evaluation files: " + ", ".join(ml["evaluation"]), ml["evaluation"]),
            ("evaluation/summary.md shown", [f"Evaluation of {tags['ledit.version']}"])]
    return [{"name": "MLflow run", "file": "mlflow-run.png", "url": run, "checks": checks},
            {"name": "MLflow run artifacts", "file": "mlflow-run-artifacts.png",
             "url": f"{run}/artifacts/evaluation/summary.md", "checks": arts}]


def mlflow_model_pages(ml: dict, base: str, status: str) -> list[dict]:
    """The registered model (versions with aliases) and the run's model version."""
    vt, v = ml["version_tags"], ml["version"]
    lineage = [tag_shown(vt, k) for k in ("ledit.mlflow_run_id", "ledit.dvc_md5", "ledit.facts_added")]
    promoted = [(f"alias production on version {v} (store: {ml['production']})", ["@ production"])]
    model = [(f"version {v} listed", [f"Version {v}"]),
             *(promoted if status == "promoted" else        # no alias to see: the rejection must be
               [("version's gate tag and reasons", [tag_shown(vt, "gate"), tag_shown(vt, "gate.reasons")])]),
             ("version tags: MLflow run, DVC md5, facts added", lineage)]
    # the version page's tags table shows its first five rows only: the reasons are in its description
    first_reason = fold(vt.get("gate.reasons", "").split("; ")[0])
    version = [*(promoted if status == "promoted" else
                 [("version's gate tag, and the reasons in its description",
                   [tag_shown(vt, "gate", " "), f"gate rejected: {first_reason}"])]),
               ("source run", [f"Source Run : {ml['run_name']}"]),
               ("tags table: gate, ledit.dvc_md5, ledit.mlflow_run_id",
                [tag_shown(vt, k, " ") for k in ("gate", "ledit.dvc_md5", "ledit.mlflow_run_id")])]
    name = urllib.parse.quote(ml["model"])
    return [{"name": "MLflow registered model", "file": "mlflow-model.png", "url": f"{base}/#/models/{name}",
             "checks": model},
            {"name": "MLflow model version", "file": "mlflow-model-version.png",
             "url": f"{base}/#/models/{name}/versions/{v}", "checks": version}]


def prefect_pages(pf: dict, base: str, summary: dict) -> list[dict]:
    """The flow run (name, state, task runs) and its run-summary artifact."""
    run = [("flow run name", [pf["name"]]), (f"state {pf['state']}", [pf["state"]]),
           (f"flow {pf['flow']}", [pf["flow"]]),
           (f"task runs: count and all {len(pf['tasks'])} names", [f"{len(pf['tasks'])} Task runs", *pf["tasks"]])]
    out = [{"name": "Prefect flow run", "file": "prefect-flow-run.png", "url": f"{base}/runs/flow-run/{pf['id']}",
            "checks": run}]
    if pf["summary_artifact"]:
        art = [(f"ledit status {summary['status']}", [f"ledit run: {summary['status']}"]),
               ("candidate version and MLflow run id", [summary["version"], summary["mlflow_run_id"]])]
        out.append({"name": "Prefect run-summary artifact", "file": "prefect-run-summary.png",
                    "url": f"{base}/artifacts/artifact/{pf['summary_artifact']}", "checks": art})
    return out


def look(binary: str, work: Path, page: dict, args, shots: Path) -> list[dict]:
    """Load the page's DOM (once more with 3x the budget if a check misses), then screenshot it."""
    budget = args.budget_ms
    for attempt in range(2):
        done = chromium(binary, work, page["url"], budget, args.window, "--dump-dom")
        text = dom_text(done.stdout)
        seen = [all(fold(s) in text for s in want) for _, want in page["checks"]]
        if all(seen) or attempt:
            break
        budget *= 3
    png = shots / page["file"]
    chromium(binary, work, page["url"], budget, args.window, f"--screenshot={png}")
    if png.exists():
        shrink_png(png)
    page.update(budget=budget, png=png if png.exists() else None, chars=len(text))
    return [{"what": what, "where": page["name"], "visible": ok} for (what, _), ok in zip(page["checks"], seen)]


# -- the report -------------------------------------------------------------------------------
def table(rows: list[dict]) -> list[str]:
    out = ["| check | where | visible |", "|---|---|---|"]
    return out + [f"| {r['what']} | {r['where']} | {'yes' if r['visible'] else '**no**'} |" for r in rows]


def versions(binary: str) -> str:
    import mlflow
    import prefect

    shown = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    browser = next((x.strip() for x in shown.splitlines() if "hrom" in x), "chromium ?")
    return f"{browser}; MLflow {mlflow.__version__}; Prefect {prefect.__version__}"


def kept_section(path: Path) -> str:
    """The person-written section of the previous report, kept as it was."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    at = old.find(UNCLEAR)
    if at >= 0:
        return old[at:].rstrip() + "\n"
    return f"{UNCLEAR}\n\n(not written yet: look at the screenshots and write it here)\n"


def render(rows: list[dict], done: dict, args, binary: str, seconds: float) -> str:
    s, pf = done["summary"], done["pf"]
    shots = args.shots.relative_to(ROOT) if args.shots.is_relative_to(ROOT) else args.shots
    head = [f"# The UIs, seen as a person sees them ({time.strftime('%Y-%m-%d %H:%M')})", "",
            "Command: `" + " ".join(["python -m bench.ui_check", *sys.argv[1:]]) + "`  ",
            f"Machine: {os.cpu_count()} CPUs, shared; {versions(binary)}.  ",
            f"Run: `ledit run` (the nightly refresh) on the first {args.facts_n} facts of "
            f"`{args.facts.name}`, gate `{args.gate}`{' (every threshold open)' if args.gate == 'open' else ''}: "
            f"**{s['status']}**, candidate {s['version']}, registry version {s.get('model_version')}, "
            f"MLflow run `{s['mlflow_run_id']}`, Prefect flow run `{pf['name']}` ({pf['state']}).  ",
            f"Took {seconds:.0f} s in all, of which the pipeline run {s['_seconds']:.0f} s.", "",
            *table(rows), "",
            f"Screenshots ({shots}/, {args.window.replace(',', 'x')} window, 64 colours):", ""]
    for p in done["pages"]:
        size = f"{p['png'].stat().st_size // 1024} kB" if p.get("png") else "not written"
        head.append(f"- `{p['file']}` ({size}): {p['name']}, `{p['url']}` "
                    f"(virtual time {p['budget'] / 1000:g} s)")
    head += ["", "A check is visible when every string it names (the tag as `key : value`, the dataset as "
             "`name (digest)`, the alias as `@ production`, each task run's name) is in the text of the DOM "
             "Chromium rendered. In the DOM is not the same as readable on the screenshot: a long tag value "
             "is in the DOM whole but cut short with an ellipsis on screen (see below).", ""]
    return "\n".join(head) + "\n" + kept_section(args.out)


# -- main ---------------------------------------------------------------------------------------
def session(binary: str, work: Path, home: Path, ports: dict, args) -> tuple[list[dict], dict]:
    """Servers up, one pipeline run, every page looked at; the servers are stopped on leaving."""
    facts = facts_file(args.facts, args.facts_n, work)
    params = open_gate_params(work) if args.gate == "open" else None
    args.shots.mkdir(parents=True, exist_ok=True)
    with ledit_server(home, ports, work / "server.log") as (prefect, mlflow):
        print(f"servers up: Prefect {prefect}, MLflow {mlflow}; home {home}", flush=True)
        t0 = time.monotonic()
        summary = run_pipeline(home, facts, (prefect, mlflow), params, work / "run.log")
        summary["_seconds"] = time.monotonic() - t0
        print(f"run {summary['status']}: {summary['version']}, MLflow run {summary['mlflow_run_id']}, "
              f"Prefect flow run {summary['flow_run_id']} ({summary['_seconds']:.0f} s)", flush=True)
        ml = mlflow_facts(mlflow, summary["mlflow_run_id"])
        pf = prefect_facts(prefect, summary["flow_run_id"])
        pages = [*mlflow_run_pages(ml, mlflow), *mlflow_model_pages(ml, mlflow, summary["status"]),
                 *prefect_pages(pf, prefect, summary)]
        rows = []
        for page in pages:
            rows += look(binary, work, page, args, args.shots)
            print(f"looked at {page['name']}: {page['url']}", flush=True)
    return rows, {"summary": summary, "pages": pages, "ml": ml, "pf": pf}


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)     # a kill stops the servers it started, too
    binary = find_chromium(args.chromium)
    if not binary:
        print("error: chromium not found; install it: apt-get install chromium", file=sys.stderr)
        sys.exit(2)
    if args.facts_n < 1:
        raise SystemExit("--facts-n must be >= 1")
    args.facts, args.shots, args.out = args.facts.resolve(), args.shots.resolve(), args.out.resolve()
    work = Path(tempfile.mkdtemp(prefix="ledit-ui-"))
    home = (args.home or work / "home").resolve()
    ports = {"Prefect": args.prefect_port or free_port(), "MLflow": args.mlflow_port or free_port()}
    t0, keep = time.monotonic(), args.keep
    try:
        rows, done = session(binary, work, home, {"prefect": ports["Prefect"], "mlflow": ports["MLflow"]}, args)
    except BaseException:
        keep = True              # the logs say why
        raise
    finally:
        print(f"logs and home kept in {work}" if keep else "", flush=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    rows += [{"what": f"{name} port {port} free after the stop", "where": "ledit server", "visible": port_free(port)}
             for name, port in ports.items()]
    text = render(rows, done, args, binary, time.monotonic() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)
    print("\n".join(table(rows)))
    failed = [r["what"] for r in rows if not r["visible"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks hold; wrote {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

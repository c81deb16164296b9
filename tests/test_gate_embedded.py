"""The gate bites (issue 16): on the embedded SmolLM2, with facts that carry no locality
prompts and no rephrases, as a feed sends them, through the pipeline's own steps (plan,
probe, train, evaluate, judge, then reject or publish) and params.yaml's thresholds.

- a ReFT candidate (no gates: the edit is written everywhere) is rejected for locality on
  the standing suite, not only for drift;
- a candidate that reads only the subject (issue 2's design) is rejected for relation
  specificity, and each fact's pending reason names the answers it changed;
- a candidate that does neither passes: the default BaFT once issue 17 lands (until then
  an expected failure, strict).

The suite sizes are cut down from params.yaml's to keep the module near a minute or two a
candidate; the thresholds are params.yaml's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from editing.config import merge, read_yaml
from tasks.settings import as_settings

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration

FEED = [  # subject, prompt, target: the whole of a feed's fact
    ("Angela Merkel", "The occupation of Angela Merkel is", "chef"),
    ("Lionel Messi", "The sport played by Lionel Messi is", "basketball"),
    ("Toyota", "The country of origin of Toyota is", "Italy"),
    ("Pablo Picasso", "The place of birth of Pablo Picasso is", "Oslo"),
]
# issue 2's design: weights read the subject alone and the edit is written on every position
# after it. It is today's default; when issue 17 changes the default, pin it here.
SUBJECT_ONLY: dict = {}


def params_for(**over) -> dict:
    base = read_yaml(ROOT / "params.yaml")
    small = {"gate": {"probes": {"standing_size": 12, "subject_probes": 3, "strict_facts": 4}}}
    return merge(merge(base, small), over)


_RUNS: dict[str, tuple] = {}


def run_candidate(tmp_path: Path, params: dict) -> tuple:
    """Plan, probe, train, evaluate and judge the feed once per distinct ``params``: while
    SUBJECT_ONLY is the default, two tests read the one run (the second only reads it)."""
    key = json.dumps(params, sort_keys=True, default=str)
    if key not in _RUNS:
        _RUNS[key] = _run_candidate(tmp_path, params)
    return _RUNS[key]


def _run_candidate(tmp_path: Path, params: dict) -> tuple:
    from tasks.pipeline import steps
    from tasks.stream.workspace import init_workspace

    h = init_workspace(tmp_path / "home")
    settings = as_settings(params)
    items = [{"fact": {"fact_id": f"feed-{i}", "subject": s, "prompt": p, "target_new": t},
              "origin": {"batch": "feed"}} for i, (s, p, t) in enumerate(FEED)]
    version = steps.plan(h, settings, [], [items])["version"]
    steps.probe(h, settings, version)
    steps.train_candidate(h, settings, version)
    evaluation = steps.evaluate_candidate(h, settings, version)
    verdict = steps.judge(h, settings, version, evaluation)
    return h, version, evaluation, verdict


def failed(verdict: dict) -> set[str]:
    return {c["metric"] for c in verdict["checks"] if not c["passed"]}


def test_reft_is_rejected_for_the_standing_suite(tmp_path):
    _, _, evaluation, verdict = run_candidate(tmp_path, params_for(edit={"method": "reft"}))
    assert not verdict["passed"]
    assert "standing_locality" in failed(verdict), verdict["reasons"]
    assert evaluation["metrics"]["locality"] is None            # the feed carried none
    assert evaluation["changed"]["standing"]                    # and the answers it changed are shown


def test_a_candidate_that_overwrites_its_subjects_is_rejected(tmp_path):
    from tasks.pipeline import steps

    h, version, evaluation, verdict = run_candidate(tmp_path, params_for(**SUBJECT_ONLY))
    assert not verdict["passed"]
    assert "relation_specificity" in failed(verdict), verdict["reasons"]
    assert evaluation["metrics"]["reliability"] >= 0.9          # the edits themselves hold
    damaged = {fid: why for fid, why in verdict["fact_reasons"].items() if "damaged its subject" in why}
    assert damaged and all("->" in why for why in damaged.values())   # with the changed answers
    steps.reject(h, version, verdict)
    pending = {p["fact_id"]: p["reason"] for p in steps.pending_facts(h)}
    assert set(pending) == {f"feed-{i}" for i in range(len(FEED))}
    assert any("damaged its subject" in pending[fid] for fid in damaged)


@pytest.mark.xfail(strict=True, reason="issue 17: today's default BaFT reads the subject alone, so it "
                   "overwrites its subjects' other relations (the test above); strict, so that the "
                   "method's fix makes this fail until the marker goes")
def test_the_default_candidate_passes(tmp_path):
    """Passing the gate; the publish that follows is the flow's (tests/test_pipeline.py)."""
    from tasks.pipeline import store as pub

    h, version, evaluation, verdict = run_candidate(tmp_path, params_for())
    m = evaluation["metrics"]
    assert verdict["passed"], verdict["reasons"]
    assert m["relation_specificity"] is not None and m["standing_locality"] is not None
    assert m["chat_success"] is not None and m["repetition_excess"] is not None
    assert pub.read_record(h, version)["verdict"]["passed"]

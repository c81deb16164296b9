"""The gate's checks on what users see (tasks/pipeline/gate.py, tasks/pipeline/probing.py), on a tiny model:
thresholds and reasons, the standing suite versioned with DVC once per base model, and the
pipeline steps that record probes before training and measure them after."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.pipeline import probing
from tasks.pipeline.gate import CHECKS, GateConfigError, gate, markdown, open_thresholds
from tasks.settings import GateSettings, ProbeConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"reliability": 1.0, "generality": 0.6, "retention": None, "locality": None, "drift": 0.01,
        "relation_specificity": 0.95, "standing_locality": 1.0, "chat_success": 0.9,
        "repetition_excess": 0.0}


@pytest.fixture(scope="module")
def settings():
    return load_settings(ROOT / "params.yaml")


def test_every_check_has_a_threshold_in_params(settings):
    for key, _, _ in CHECKS.values():
        assert isinstance(getattr(settings.gate, key), (int, float)), key
    assert settings.gate.probes.standing_size > 0


def test_new_checks_reject_with_figure_threshold_and_meaning(settings):
    v = gate(GOOD, [], settings.gate)
    assert v.passed
    for metric, limit in (("relation_specificity", 0.1), ("standing_locality", 0.5),
                          ("chat_success", 0.2), ("repetition_excess", 0.6)):
        v = gate(dict(GOOD, **{metric: limit}), [], settings.gate)
        assert not v.passed and len(v.reasons) == 1
        assert v.reasons[0].startswith(f"{metric} {limit:.3f} (needs")
        assert CHECKS[metric][2] in v.reasons[0]


def test_unmeasured_checks_pass_and_say_why(settings):
    notes = {"locality": "no fact carries locality prompts", "chat_success": "no chat template"}
    v = gate(dict(GOOD, chat_success=None), [], settings.gate, notes=notes)
    assert v.passed
    checks = {c.metric: c for c in v.checks}
    assert checks["locality"].value is None and checks["locality"].note == notes["locality"]
    assert "not measured (no chat template)" in checks["chat_success"].describe()
    table = markdown(v, "v1")
    assert "not measured: no fact carries locality prompts" in table
    assert "| relation_specificity | 0.950 |" in table


def test_a_fact_that_damaged_its_subject_is_named_with_its_changed_answers(settings):
    rows = [{"fact_id": "a", "kind": "new", "reliability": 1.0, "relation_specificity": 0.2,
             "changed_answers": "'The gender of X is': 'female' -> 'Paris'"},
            {"fact_id": "b", "kind": "new", "reliability": 1.0, "relation_specificity": 1.0}]
    v = gate(GOOD, rows, settings.gate)
    assert "damaged its subject: relation specificity 0.20" in v.fact_reasons["a"]
    assert "'female' -> 'Paris'" in v.fact_reasons["a"]
    assert "b" not in v.fact_reasons


def test_thresholds_are_required_and_open_thresholds_pass_anything(settings):
    broken = {k: v for k, v in settings.gate.to_dict().items() if k != "min_standing_locality"}
    with pytest.raises(GateConfigError, match="gate.min_standing_locality"):
        gate(GOOD, [], GateSettings.from_dict(broken))
    worst = {m: (0.0 if op == ">=" else 1e6) for m, (_, op, _) in CHECKS.items()}
    assert gate(worst, [{"fact_id": "z", "kind": "new", "reliability": 0.0, "relation_specificity": 0.0}],
                open_thresholds()).passed


def test_probe_settings_are_checked(settings):
    with pytest.raises(ProbeConfigError, match="gate.probes is missing"):
        GateSettings.from_dict(settings.gate.thresholds())
    with pytest.raises(ProbeConfigError, match="standing_size must be a whole number"):
        settings.override({"gate": {"probes": {"standing_size": -1}}})


# -- the standing suite in the data workspace --------------------------------------------------------
def test_standing_answers_are_recorded_once_and_versioned_with_dvc(tiny_model, tokenizer, tmp_path, settings):
    from tasks.stream import version
    from tasks.stream.workspace import init_workspace

    h = init_workspace(tmp_path / "home")
    probe = settings.gate.probes.override({"standing_size": 2, "standing_tokens": 3})
    first = probing.standing_answers(h, probe, tiny_model, tokenizer)
    assert len(first["answers"]) == 4 and first["suite"]              # 2 prompts, plain and chat
    (saved,) = (h.workspace / "probes").glob("standing-*.json")
    assert (saved.parent / f"{saved.name}.dvc").exists()
    assert version.git(h.workspace, "ls-files", "--error-unmatch", f"probes/{saved.name}.dvc").returncode == 0
    assert len(version.tags(h.workspace, "probes-*")) == 1
    assert any(f.is_file() for f in h.default_remote.rglob("*"))       # pushed to the DVC remote
    saved.write_text(json.dumps(dict(json.loads(saved.read_text()), marker="read back")))
    again = probing.standing_answers(h, probe, tiny_model, tokenizer)
    assert again.get("marker") == "read back"                         # not recorded a second time
    bigger = probe.override({"standing_size": 3})
    third = probing.standing_answers(h, bigger, tiny_model, tokenizer)
    assert len(third["answers"]) == 6 and "marker" not in third        # another suite: recorded anew
    assert len(version.tags(h.workspace, "probes-*")) == 2


def test_probe_then_strict_checks_on_a_candidate(tiny_dir, tmp_path, settings):
    """The pipeline's steps: plan, probe (before training), train, evaluate with the checks."""
    from tasks.pipeline.evaluate import evaluate_candidate, probe
    from tasks.pipeline.plan import plan
    from tasks.pipeline.promote import judge
    from tasks.pipeline.train import train_candidate
    from tasks.stream.workspace import init_workspace

    p = settings.override({
        "model": {"name": str(tiny_dir), "dtype": "float32"},
        "edit": {"layers": [2], "steps": 3, "batch_size": 8, "early_stop": {"check_every": 5},
                 "baft": {"gate_layer": 1, "prefixes": 1, "prefix_tokens": 3, "subject_swaps": 1}},
        "eval": {"fluency_tokens": 0},
        "gate": {**open_thresholds().thresholds(), "probes": {"standing_size": 2, "standing_tokens": 3,
                                                              "subject_probes": 2, "subject_tokens": 3,
                                                              "strict_facts": 1, "strict_tokens": 3}}})
    h = init_workspace(tmp_path / "home")
    facts = [{"fact": {"fact_id": f"f{i}", "subject": f"Person {i}", "prompt": f"Person {i} works in",
                       "target_new": f"Town{i}", "op": "upsert"}, "origin": {}} for i in range(2)]
    version = plan(h, p, [], [facts])["version"]
    probed = probe(h, p, version)
    assert probed["standing_prompts"] == 4
    evaluation = (train_candidate(h, p, version), evaluate_candidate(h, p, version))[1]
    m, notes = evaluation["metrics"], evaluation["notes"]
    assert m["relation_specificity"] is not None or "relation_specificity" in notes
    assert 0.0 <= m["standing_locality"] <= 1.0 and "standing_locality_plain" in m
    assert m["strict_facts"] == 1 and m["repetition_excess"] is not None
    assert m["fluency"] is not None            # read off the strict continuations, for the sampled fact
    sampled = [r for r in evaluation["per_fact"] if r.get("fluency") is not None]
    assert len(sampled) == 1 and sampled[0]["kind"] == "new"
    assert "locality" in notes and "standing suite" in notes["locality"]   # no locality prompts
    assert {"eval_seconds_relation_specificity", "eval_seconds_standing_locality",
            "eval_seconds_generation"} <= set(m)
    verdict = judge(h, p, version, evaluation)
    assert verdict["passed"]
    assert {c["metric"] for c in verdict["checks"]} == set(CHECKS)

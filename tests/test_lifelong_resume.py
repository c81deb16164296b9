"""bench/lifelong.py in parts, on a tiny random Llama: a run stopped and resumed from its
--checkpoint gives the figures of a straight run, a checkpoint of other settings is refused,
a crash while committing a night leaves the previous checkpoint whole, and --milestones
score every edit so far along the way."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from test_trainer import tiny_params

from bench import lifelong
from editing import AdapterSet
from editing.evaluate import evaluate_facts
from editing.facts import records_to_facts

ROOT = Path(__file__).resolve().parent.parent
BATCH = 2                                      # six facts: three nights of two
RUN = {"dataset": "counterfact", "offset": 0, "overrides": []}


@pytest.fixture(scope="module")
def facts():
    """Six CounterFact records: each with rephrases and neighbourhood (locality) prompts."""
    records = json.loads((ROOT / "data" / "samples" / "counterfact-sample.json").read_text())
    out = list(records_to_facts(records[:6]))
    assert len(out) == 6 and all(f.rephrase_prompts and f.locality for f in out)
    return out


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def settings():
    return SimpleNamespace(edit=tiny_params(steps=8, lr=0.1))     # enough to learn most edits


def run(model, tokenizer, facts, settings, **kw):
    kw = {"run": RUN, **kw}
    return lifelong.run_sequence(model, tokenizer, facts, "baft", settings, kw.pop("batch_size", BATCH), **kw)


@pytest.fixture(scope="module")
def straight(model, tokenizer, facts, settings):
    """Three nights in one go, no checkpoint, milestones after nights 1 and 2."""
    return run(model, tokenizer, facts, settings, milestones=[2, 4])


def _same_result(a: dict, b: dict) -> None:
    assert a["immediate"] == b["immediate"] and len(a["immediate"]) == 3
    assert a["final"]["means"] == b["final"]["means"]
    assert a["final"]["per_fact"] == b["final"]["per_fact"]
    assert a["set"].fact_ids == b["set"].fact_ids
    ta, tb = a["set"].tensors(), b["set"].tensors()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _along(result: dict) -> list:
    """The milestone rows' figures (not their timings)."""
    return [{k: m[k] for k in ("milestone", "edits", *lifelong.TRIO)} for m in result["milestones"]]


def _counting_edits(monkeypatch) -> list:
    """Count the nights trained from here on (lifelong.edit calls)."""
    calls, real = [], lifelong.edit
    monkeypatch.setattr(lifelong, "edit", lambda *a, **k: calls.append(k["training_run"]) or real(*a, **k))
    return calls


def test_a_resumed_run_gives_the_figures_of_a_straight_run(model, tokenizer, facts, settings, straight,
                                                          tmp_path, monkeypatch):
    assert straight["final"]["means"]["reliability"] > 0.5          # figures worth comparing
    ck = tmp_path / "ck"
    assert run(model, tokenizer, facts, settings, checkpoint=ck, stop_after_nights=1, milestones=[2, 4]) is None
    state = json.loads((ck / lifelong.STATE_FILE).read_text())
    assert len(state["nights"]) == 1 and state["set"] == "set-000001" and state["row"] is None
    assert [m["edits"] for m in state["milestones"]] == [2]        # scored before stopping
    assert AdapterSet.load(ck / state["set"]).fact_ids == [f.fact_id for f in facts[:2]]
    assert (ck / lifelong.BASE_LOC_FILE).is_file()

    nights = _counting_edits(monkeypatch)
    resumed = run(model, tokenizer, facts, settings, checkpoint=ck, milestones=[2, 4])
    assert nights == ["night-2", "night-3"]                        # went on; night 1 not trained again
    _same_result(resumed, straight)
    assert resumed["nights"][0] == state["nights"][0]              # night 1's record as saved
    assert _along(resumed) == _along(straight)
    assert resumed["invocations"] == 2
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("set-")) == ["set-000003"]


def test_b_a_checkpoint_of_other_settings_is_refused_naming_the_field(model, tokenizer, facts, settings,
                                                                      tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    assert run(model, tokenizer, facts, settings, checkpoint=ck, stop_after_nights=1) is None
    before = (ck / lifelong.STATE_FILE).read_bytes()
    nights = _counting_edits(monkeypatch)
    other = {"batch": dict(batch_size=3),
             "T": dict(facts=facts[:4]),
             "dataset": dict(run={**RUN, "dataset": "zsre"}),
             "offset": dict(run={**RUN, "offset": 10}),
             "overrides": dict(run={**RUN, "overrides": ["edit.steps=3"]}),
             "facts": dict(facts=facts[::-1]),
             "edit.steps": dict(settings=SimpleNamespace(edit=tiny_params(steps=3, lr=0.1))),
             "model": dict(model=make_tiny_llama(model.config.vocab_size, seed=1))}
    for field, change in other.items():
        kw = {"model": model, "facts": facts, "settings": settings, **change}
        with pytest.raises(lifelong.CheckpointMismatch, match=rf"{field.replace('.', '[.]')} is") as err:
            run(kw.pop("model"), tokenizer, kw.pop("facts"), kw.pop("settings"), checkpoint=ck, **kw)
        assert str(ck) in str(err.value)
    with pytest.raises(lifelong.CheckpointMismatch, match="method is 'baft' there and 'lora' here"):
        lifelong.run_sequence(model, tokenizer, facts, "lora", settings, BATCH, checkpoint=ck, run=RUN)
    assert nights == [] and (ck / lifelong.STATE_FILE).read_bytes() == before


def test_c_a_crash_while_committing_a_night_leaves_the_previous_checkpoint(model, tokenizer, facts, settings,
                                                                           straight, tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    real, writes = lifelong.write_state, []

    def crashing(directory, state):
        writes.append(len(state["nights"]))
        if len(state["nights"]) == 2:        # night 2's set is saved; its state never lands
            raise OSError("simulated crash while writing the state")
        real(directory, state)
    monkeypatch.setattr(lifelong, "write_state", crashing)
    with pytest.raises(OSError, match="simulated"):
        run(model, tokenizer, facts, settings, checkpoint=ck, milestones=[2, 4])
    assert writes == [1, 1, 2]               # night 1, milestone 2, night 2 (crashed)
    assert (ck / "set-000002").is_dir()      # the orphan set of the night that did not commit
    state = json.loads((ck / lifelong.STATE_FILE).read_text())
    assert len(state["nights"]) == 1 and state["set"] == "set-000001"
    assert AdapterSet.load(ck / state["set"]).fact_ids == [f.fact_id for f in facts[:2]]

    monkeypatch.setattr(lifelong, "write_state", real)
    nights = _counting_edits(monkeypatch)
    resumed = run(model, tokenizer, facts, settings, checkpoint=ck, milestones=[2, 4])
    assert nights == ["night-2", "night-3"]
    _same_result(resumed, straight)
    assert _along(resumed) == _along(straight)


def test_d_milestones_score_every_edit_so_far_at_the_requested_T(model, tokenizer, facts, settings, straight):
    along = straight["milestones"]
    assert [m["edits"] for m in along] == [2, 4, 6]              # the final T is always the last row
    assert {k: along[-1][k] for k in lifelong.TRIO} == {k: straight["final"]["means"][k] for k in lifelong.TRIO}
    # Milestone 4 is the final protocol on facts[:4] with the set of nights 1-2.
    two_nights = straight["set"].rollback(straight["set"].blocks[2].block_id)
    expected = evaluate_facts(model, tokenizer, facts[:4], attach=two_nights.attach)["means"]
    assert {k: along[1][k] for k in lifelong.TRIO} == pytest.approx({k: expected[k] for k in lifelong.TRIO})
    assert along[1]["locality"] is not None and along[1]["generality"] is not None
    # A milestone inside a night is scored after it; one beyond T, or at T, adds no row.
    odd = run(model, tokenizer, facts[:4], settings, milestones=[3, 4, 99])
    assert [m["edits"] for m in odd["milestones"]] == [4]
    odd = run(model, tokenizer, facts, settings, milestones=[1, 3])
    assert [(m.get("milestone"), m["edits"]) for m in odd["milestones"]] == [(1, 2), (3, 4), (6, 6)]


def _cli(tiny_dir, ck, out, *extra):
    tiny = ["model.name=" + tiny_dir, "edit.layers=[2]", "edit.steps=8", "edit.lr=0.1", "edit.batch_size=8",
            "edit.baft.gate_layer=1", "edit.baft.prefixes=2", "edit.baft.prefix_tokens=3", "edit.baft.subject_swaps=1"]
    return ["--datasets", "counterfact", "--T", "6", "--batch-size", "2", "--methods", "baft",
            "--data-dir", str(ck.parent / "no-data"),      # the bundled CounterFact sample
            "--overhead-rounds", "0", "--overhead-edits", "0", "--checkpoint", str(ck), "--out", str(out),
            *[a for s in tiny for a in ("--set", s)], *extra]


def test_the_command_line_in_parts_writes_the_table_once_complete(tiny_dir, tmp_path, monkeypatch):
    ck, out = tmp_path / "ck", tmp_path / "ll.md"
    lifelong.main(_cli(tiny_dir, ck, out, "--milestones", "2", "--stop-after-nights", "2"))
    assert not out.exists() and len(json.loads((ck / "state.json").read_text())["nights"]) == 2
    other_T = _cli(tiny_dir, ck, out, "--milestones", "2")
    other_T[other_T.index("--T") + 1] = "4"
    with pytest.raises(SystemExit, match="T is 6 there and 4 here"):
        lifelong.main(other_T)
    lifelong.main(_cli(tiny_dir, ck, out, "--milestones", "2"))
    table = out.read_text()
    assert "Final-set quality along the way" in table and "Cost along the way" in table
    along = [line for line in table.splitlines() if line.startswith("| counterfact | 6 | 2 | baft ")]
    assert len(along) == 4                   # the main table, milestones 2 and 6, the cost table
    row = json.loads((ck / "state.json").read_text())["row"]
    assert [m["edits"] for m in row["milestones"]] == [2, 6] and row["parts"] == 2
    assert len(row["night_s_per_edit"]) == 3 and row["peak_rss_mib"] > 0 and row["load_s"] > 0
    assert len(row["retention"]) == len(row["retention_gen"]) == 3
    # Complete: the same command again trains and scores nothing, and writes the same rows.
    monkeypatch.setattr(lifelong, "edit", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(lifelong, "evaluate_facts", lambda *a, **k: pytest.fail("scored again"))
    out.unlink()
    lifelong.main(_cli(tiny_dir, ck, out, "--milestones", "2"))
    assert [line for line in out.read_text().splitlines() if line.startswith("| counterfact")] == \
        [line for line in table.splitlines() if line.startswith("| counterfact")]
    with pytest.raises(SystemExit):
        lifelong.main(_cli(tiny_dir, ck, out, "--methods", "baft", "lora"))   # one run per checkpoint


def test_retention_by_age_groups_batches_oldest_first():
    assert lifelong.age_groups(3) == [(0, 1), (1, 2), (2, 3)]
    groups = lifelong.age_groups(25)
    assert len(groups) == 10 and groups[0][0] == 0 and groups[-1][1] == 25
    assert all(a < b and b == c for (a, b), (c, _) in zip(groups, groups[1:]))
    row = {"T": 37, "batch": 2, "retention": [1.0] * 18 + [0.0], "retention_gen": [0.5] * 18 + [None]}
    aged = lifelong.retention_by_age(row)      # 19 batches, the last of one edit
    assert len(aged) == 10 and sum(g["edits"] for g in aged) == 37
    assert aged[0] == {"batches": (1, 2), "edits": 4, "reliability": 1.0, "generality": 0.5}
    assert aged[-1]["batches"] == (18, 19) and aged[-1]["edits"] == 3
    assert aged[-1]["reliability"] == pytest.approx(2 / 3)      # weighted by edits: (2 x 1 + 1 x 0) / 3
    assert aged[-1]["generality"] == 0.5       # the last batch has no generality figure

"""Lifelong editing on the embedded SmolLM2-135M, small T: supersede, retract,
retention after three nightly batches. (Mechanics are in test_lifelong.py.)"""
import json
from pathlib import Path

import pytest
import torch

from editing import Fact, edit, load_facts
from tasks.settings import load_settings
from editing.evaluate import evaluate_facts
from editing.metrics import token_accuracy

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def facts():
    demo = load_facts([ROOT / "data" / "samples" / "demo-facts.jsonl"])
    records = json.loads((ROOT / "data" / "samples" / "counterfact-sample.json").read_text())
    from editing.facts import records_to_facts
    return demo + list(records_to_facts(records[:2]))   # six facts, three nights of two


@pytest.fixture(scope="module")
def nights(embedded, facts):
    model, tokenizer = embedded
    params = load_settings().edit
    sets, current = [], None
    for night in range(3):
        current = edit(model, tokenizer, facts[2 * night:2 * night + 2], params, base=current, progress=False)
        sets.append(current)
    return sets


def _accuracy(embedded, adapter_set, pairs):
    model, tokenizer = embedded
    with adapter_set.attach(model):
        return token_accuracy(model, tokenizer, pairs)


def test_retention_after_three_batches(embedded, facts, nights):
    model, tokenizer = embedded
    final = evaluate_facts(model, tokenizer, facts, attach=nights[-1].attach)["means"]
    assert len(nights[-1].blocks) == 3
    assert final["reliability"] >= 0.9       # every edit, on the final set
    assert final["locality"] >= 0.9


def test_supersede_in_a_later_batch(embedded, facts, nights):
    model, tokenizer = embedded
    old = facts[1]                                            # the Eiffel Tower -> Rome, night 1
    new = Fact(subject=old.subject, prompt=old.prompt, target_new="Berlin", fact_id=old.fact_id)
    updated = edit(model, tokenizer, [new], load_settings().edit, base=nights[-1], progress=False)
    assert updated.changes["superseded"] == [old.fact_id]
    assert _accuracy(embedded, updated, [(old.prompt, "Berlin")])[0] == 1.0
    assert _accuracy(embedded, updated, [(old.prompt, "Rome")])[0] == 0.0   # the old target no longer comes out


def test_supersede_within_one_batch(embedded, facts):
    model, tokenizer = embedded
    f = facts[2]                                              # Michael Jordan
    first = Fact(subject=f.subject, prompt=f.prompt, target_new="chess player")
    second = Fact(subject=f.subject, prompt=f.prompt, target_new="golfer")
    s = edit(model, tokenizer, [first, second], load_settings().edit, progress=False)
    assert [x.target_new for x in s.facts()] == ["golfer"]
    assert _accuracy(embedded, s, [(f.prompt, "golfer"), (f.prompt, "chess player")]) == [1.0, 0.0]


def test_retract_returns_the_base_answer(embedded, facts, nights):
    model, tokenizer = embedded
    gone = facts[0]                                           # night 1 also holds facts[1]
    retracted = edit(model, tokenizer, [Fact(subject="", prompt="", target_new="",
                                             fact_id=gone.fact_id, op="retract")],
                     load_settings().edit, base=nights[-1], progress=False)
    assert gone.fact_id not in retracted.fact_ids
    ids = tokenizer([gone.prompt], return_tensors="pt").input_ids
    with torch.no_grad():
        bare = model(ids).logits[0, -1].argmax()
        with retracted.attach(model):
            after = model(ids).logits[0, -1].argmax()
    assert after == bare                                       # the base's own next token again
    kept = [(f.prompt, f.target_new) for f in facts[1:]]
    assert min(_accuracy(embedded, retracted, kept)) >= 0.5   # the other edits stay

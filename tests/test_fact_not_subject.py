"""Edit the fact, not the subject (issue 17), on the embedded SmolLM2-135M: two facts
about one subject both hold, in one batch and across two batches, and the subject's
other relations keep the base model's answers."""
import pytest
import torch

from editing import Fact, edit
from editing.baft import BaFTIntervention
from editing.metrics import answer_argmax, token_accuracy

pytestmark = pytest.mark.integration

SUBJECT = "Danielle Darrieux"
FACTS = [
    Fact(subject=SUBJECT, prompt="The mother tongue of Danielle Darrieux is", target_new="Swedish"),
    Fact(subject=SUBJECT, prompt="Danielle Darrieux was born in the city of", target_new="Tokyo"),
]
# The same subject asked about other relations (not the training templates' wording).
OTHERS = ["Danielle Darrieux worked as an", "The country Danielle Darrieux was a citizen of is",
          "Danielle Darrieux died in the year"]


def params():
    from tasks.settings import load_settings
    return load_settings().edit.override({"baft": {
        "query_gate": True, "relation_swaps": 6, "chat_positives": False, "prefixes": 2,
        "query_margin": 2.0, "query_ceiling": 1.0}})


@pytest.fixture(scope="module")
def base_answers(embedded):
    model, tokenizer = embedded
    from editing.metrics import continuations
    answers = continuations(model, tokenizer, OTHERS, 3)
    pairs = [(p, a.strip() or "the") for p, a in zip(OTHERS, answers)]
    return pairs, answer_argmax(model, tokenizer, pairs)


def _check(embedded, adapter_set, base_answers):
    model, tokenizer = embedded
    pairs, base = base_answers
    with adapter_set.attach(model):
        accuracy = token_accuracy(model, tokenizer, [(f.prompt, f.target_new) for f in FACTS])
        kept = answer_argmax(model, tokenizer, pairs)
    assert accuracy == [1.0, 1.0]
    assert [k for k, _ in kept] == [b for b, _ in base]


def test_two_facts_on_one_subject_in_one_batch(embedded, base_answers):
    model, tokenizer = embedded
    s = edit(model, tokenizer, FACTS, params(), progress=False)
    assert next(iter(s.blocks[0].interventions.values())).query
    _check(embedded, s, base_answers)


def test_two_facts_on_one_subject_across_batches(embedded, base_answers, tmp_path):
    model, tokenizer = embedded
    first = edit(model, tokenizer, FACTS[:1], params(), progress=False)
    second = edit(model, tokenizer, FACTS[1:], params(), base=first, progress=False)
    _check(embedded, second, base_answers)
    from editing import AdapterSet
    loaded = AdapterSet.load(second.save(tmp_path / "set"))    # the question gates survive a save
    _check(embedded, loaded, base_answers)


def test_blocks_without_question_gate_stack_with_ones_that_have_it():
    old = BaFTIntervention(8, 2, gate_layer=0)
    new = BaFTIntervention(8, 2, gate_layer=0, query=True)
    torch.nn.init.normal_(new.Q)
    with torch.no_grad():
        for iv in (old, new):
            iv.W.normal_()
            iv.G.normal_()
    h, s = torch.randn(3, 8), torch.rand(3, 4)
    both = BaFTIntervention.stack([old, new])
    assert both.query
    with torch.no_grad():
        expected = old(h, s[:, :2]) + new(h, s[:, 2:]) - h
        assert torch.allclose(both(h, s), expected, atol=1e-5)

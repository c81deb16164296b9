"""Same-subject probes and the standing locality suite (editing/probes.py), on a tiny model."""
import json
from pathlib import Path

import pytest
import torch

from editing import metrics, probes
from editing.models import fingerprint
from editing.facts import Fact, normalise
from conftest import make_tiny_llama

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"


@pytest.fixture(scope="module")
def templates():
    return probes.load_templates()


class ForceToken:
    """An "edit" that changes every generation: ``lm_head`` always picks one token."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def attach(self, model):
        def hook(module, args, output):
            forced = torch.full_like(output, -1e4)
            forced[..., self.token_id] = 0.0
            return forced
        return model.lm_head.register_forward_hook(hook)   # a handle with .remove()


def _facts():
    return [Fact(subject="Ada Lovelace", prompt="Ada Lovelace worked as a", target_new="painter",
                 relation="occupation"),
            Fact(subject="Ada Lovelace", prompt="Ada Lovelace was born in the city of",
                 target_new="Rome")]


def test_templates_load_and_each_holds_the_subject(templates):
    assert len(templates) >= 25
    for name, spec in templates.items():
        assert spec["keywords"], name
        assert all("{subject}" in t for t in spec["templates"]), name


def test_templates_without_subject_are_refused(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("relations:\n  capital:\n    label: capital\n    keywords: [capital]\n    templates: ['The capital is']\n")
    with pytest.raises(ValueError, match="capital"):
        probes.load_templates(bad)
    empty = tmp_path / "e.yaml"          # a relation with no template at all
    empty.write_text("relations:\n  capital:\n    label: capital\n    keywords: [capital]\n    templates: []\n")
    with pytest.raises(ValueError, match="capital"):
        probes.load_templates(empty)
    unlabelled = tmp_path / "u.yaml"
    unlabelled.write_text("relations:\n  capital:\n    keywords: [capital]\n    templates: ['{subject}']\n")
    with pytest.raises(ValueError, match="label"):
        probes.load_templates(unlabelled)


def test_own_relation_is_excluded_by_name(templates):
    fact = Fact(subject="Ada Lovelace", prompt="Ada Lovelace is", target_new="x", relation="spouse")
    assert probes.own_relations(fact, templates) == {"spouse"}
    every = probes.subject_probes(fact, templates, k=len(templates))
    assert len(every) == 2 * (len(templates) - 1)               # the label form and a template
    assert not any(p in every for p in [t.replace("{subject}", "Ada Lovelace")
                                        for t in templates["spouse"]["templates"]])
    assert "The spouse of Ada Lovelace is" not in every
    assert all("Ada Lovelace" in p for p in every)


def test_own_relation_is_excluded_by_prompt_keyword(templates):
    fact = Fact(subject="Acme Corp", prompt="The headquarters of Acme Corp are in", target_new="Oslo")
    assert "headquarters" in probes.own_relations(fact, templates)
    every = probes.subject_probes(fact, templates, k=len(templates))
    assert not any("head office" in p or "headquarters" in p for p in every)
    # the subject's own words are not keywords: "Born Free" is not about a birthplace
    film = Fact(subject="Born Free", prompt="Born Free was directed by", target_new="x")
    assert probes.own_relations(film, templates) == {"director"}


def test_same_fact_same_probes_and_facts_on_one_subject_differ(templates):
    a, b = _facts()
    first = probes.subject_probes(a, templates, k=5)
    assert len(first) == 10 and first == probes.subject_probes(a, templates, k=5)   # two forms each
    assert first[0].startswith("The ") and first[0].endswith(" of Ada Lovelace is")
    assert first == probes.subject_probes(Fact(**a.to_dict()), probes.load_templates(), k=5)
    assert first != probes.subject_probes(b, templates, k=5)


def test_relation_specificity_is_one_unedited_and_zero_when_every_answer_changes(tiny_model, tokenizer):
    recorded = probes.record_subject_probes(tiny_model, tokenizer, _facts(), k=3, max_new_tokens=4)
    assert [r["fact_id"] for r in recorded] == [f.fact_id for f in _facts()]
    assert all(len(r["prompts"]) == len(r["base"]) == len(r["base_argmax"]) for r in recorded)
    assert all(b and "\n" not in b for r in recorded for b in r["base"])     # one line, never empty
    # read off the greedy ids where the answer re-tokenises to them: what teacher forcing gives
    pairs = [(p, b) for r in recorded for p, b in zip(r["prompts"], r["base"])]
    assert [x for r in recorded for x in r["base_argmax"]] == \
        [pred for pred, _ in metrics.answer_argmax(tiny_model, tokenizer, pairs)]

    same = probes.relation_specificity(tiny_model, tokenizer, recorded)
    assert same["mean"] == 1.0
    assert all(f["specificity"] == 1.0 and f["changed"] == [] for f in same["per_fact"])

    token = tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
    hit = probes.relation_specificity(tiny_model, tokenizer, recorded, attach=ForceToken(token))
    assert hit["mean"] == 0.0
    for fact, r in zip(hit["per_fact"], recorded):
        assert fact["specificity"] == 0.0
        assert [c["prompt"] for c in fact["changed"]] == r["prompts"][:3]       # the first three shown
        assert all(c["base"] == b and "zebra" in c["edited"] for c, b in zip(fact["changed"], r["base"]))
    # the hook is gone again
    assert probes.relation_specificity(tiny_model, tokenizer, recorded)["mean"] == 1.0
    assert probes.relation_specificity(tiny_model, tokenizer, []) == {"per_fact": [], "mean": None}


def test_relations_of_other_facts_on_the_subject_are_not_probed(templates):
    a, b = _facts()                              # occupation, and place of birth by keyword
    alone = probes.subject_probes(a, templates, k=len(templates))
    assert not any("born" in p or "birthplace" in p for p in probes.subject_probes(
        a, templates, k=len(templates), exclude=probes.own_relations(b, templates)))
    assert any("born" in p or "birthplace" in p for p in alone)


def test_standing_suite_has_both_forms(tokenizer):
    prompts = probes.load_standing_prompts()
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    suite = probes.standing_suite(prompts[:3], tokenizer, chat=True)
    assert [s["form"] for s in suite] == ["plain"] * 3 + ["chat"] * 3
    assert [s["prompt"] for s in suite] == prompts[:3] * 2
    assert all(s["text"] != s["prompt"] and s["prompt"] in s["text"] for s in suite[3:])
    assert [s["form"] for s in probes.standing_suite(prompts[:3], tokenizer, chat=False)] == ["plain"] * 3
    assert len(probes.load_standing_prompts(n=7)) == 7


def test_standing_answers_round_trip_and_measure(tiny_model, tokenizer, tmp_path):
    suite = probes.standing_suite(probes.load_standing_prompts(n=2), tokenizer)
    record = probes.record_standing_answers(tiny_model, tokenizer, suite, max_new_tokens=4)
    path = probes.save_standing_answers(tmp_path / "sub" / "standing.json", record)
    assert [p.name for p in path.parent.iterdir()] == ["standing.json"]   # no temp file left
    loaded = probes.load_standing_answers(path, tiny_model)
    assert loaded == record and loaded["forms"] == ["plain", "chat"]

    same = probes.standing_locality(tiny_model, tokenizer, loaded)
    assert same == {"mean": 1.0, "per_form": {"plain": 1.0, "chat": 1.0}, "changed": []}
    token = tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
    hit = probes.standing_locality(tiny_model, tokenizer, loaded, attach=ForceToken(token))
    assert hit["mean"] == 0.0 and hit["per_form"] == {"plain": 0.0, "chat": 0.0}
    assert [(c["form"], c["prompt"]) for c in hit["changed"]] == [(s["form"], s["prompt"]) for s in suite]


def test_load_refuses_another_base_model(tiny_model, tokenizer, tmp_path):
    suite = probes.standing_suite(probes.load_standing_prompts(n=1), tokenizer, chat=False)
    record = probes.record_standing_answers(tiny_model, tokenizer, suite, max_new_tokens=2)
    path = probes.save_standing_answers(tmp_path / "standing.json", record)
    other = make_tiny_llama(len(tokenizer), seed=1)
    with pytest.raises(probes.FingerprintMismatch) as err:
        probes.load_standing_answers(path, other)
    assert record["fingerprint"] in str(err.value)
    assert fingerprint(other) in str(err.value)
    with pytest.raises(probes.FingerprintMismatch):
        probes.standing_locality(other, tokenizer, record)


def _sample_prompts():
    """Every prompt-like string in the bundled benchmark-style samples, and their subjects."""
    texts, subjects = set(), set()

    def walk(value, key=""):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str):
            if key == "subject":
                subjects.add(value)
            texts.add(normalise(value.removeprefix("nq question: ")))

    for path in SAMPLES.glob("*.json"):
        walk(json.loads(path.read_text()))
    for path in SAMPLES.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                walk(json.loads(line))
    return texts, subjects


def test_no_probe_equals_a_sample_prompt(templates):
    texts, subjects = _sample_prompts()
    assert len(texts) > 20 and subjects
    for prompt in probes.load_standing_prompts():
        assert normalise(prompt) not in texts, prompt
    # The hand-written templates are this project's own. The label form ("The {label} of
    # {subject} is") is the plain cloze of a relation, which WikiData-built sets use too: it
    # may equal one of their prompts. Probes only measure; nothing is trained on them.
    for spec in templates.values():
        for template in spec["templates"]:
            for subject in subjects:
                assert normalise(template.replace("{subject}", subject)) not in texts, template


def test_the_recorded_answer_is_the_short_answer_of_a_continuation():
    assert probes.short_answer(" Paris, which is also the largest city.\nMore") == "Paris"
    assert probes.short_answer("\n the 1990s (roughly). Then") == "the 1990s"
    assert probes.short_answer("Dr Who is a show") == "Dr Who is a show"
    assert probes.short_answer(". nothing") == ""

"""``edit.baft.relation_positives`` (issue 17): more wordings of a fact's own relation, from the
training templates, as positives of the question gate; 0 builds exactly what was built before."""
import random

import torch
import yaml

from editing import Fact, edit
from editing.examples import (TRAINING_TEMPLATES, chat_items, encode, load_training_templates,
                              model_prefixes, own_relation, positive_items, relation_positive_items)
from editing.trainer import _examples, _frozen_states, _gate_targets, _new_block, _setup
from tasks.settings import load_settings

KNOWN = Fact(subject="Danielle Darrieux", prompt="The occupation of Danielle Darrieux is", target_new="pilot")
UNKNOWN = Fact(subject="Toko Yasuda", prompt="Toko Yasuda is fond of", target_new="tea")


def tiny_params(n: int, **baft):
    return load_settings().edit.override({
        "layers": [2], "steps": 4, "batch_size": 8,
        "baft": {"gate_layer": 1, "prefixes": 2, "prefix_tokens": 3, "subject_swaps": 1, "query_gate": True,
                 "chat_positives": True, "relation_positives": n, **baft}})


def examples(model, tokenizer, facts, config):
    run = _setup(model, config, None)
    return _examples(model, tokenizer, facts, run, random.Random(config.seed), None, []), run


def test_the_templates_recognise_one_relation_and_not_the_other():
    templates = load_training_templates()
    assert own_relation(KNOWN, templates)[0] == "occupation"
    assert own_relation(UNKNOWN, templates) is None
    # Overlapping keywords: the longest one named decides.
    cit = Fact(subject="Ernest Brooks", prompt="The name of the country of citizenship of Ernest Brooks is",
               target_new="Vandals")
    assert own_relation(cit, templates)[0] == "citizenship"


def test_zero_builds_the_examples_as_before(tiny_model, tokenizer):
    facts = [KNOWN, UNKNOWN]
    ex, _ = examples(tiny_model, tokenizer, facts, tiny_params(0))
    # What the trainer built before the setting: the prompts, their prefixed variants, the chat rows.
    prefixes = model_prefixes(tiny_model, tokenizer, 2, 3, 0)
    before = encode(tokenizer, positive_items(facts, prefixes, ["", ""]) + chat_items(tokenizer, facts))
    for name in ("ids", "lengths", "fact", "target_mask", "subject_pos", "keep_mask"):
        assert torch.equal(getattr(ex.pos, name), getattr(before, name)), name
    # A fact the templates do not recognise gets nothing, whatever N.
    alone, _ = examples(tiny_model, tokenizer, [UNKNOWN], tiny_params(3))
    zero, _ = examples(tiny_model, tokenizer, [UNKNOWN], tiny_params(0))
    assert torch.equal(alone.pos.ids, zero.pos.ids) and torch.equal(alone.pos.fact, zero.pos.fact)


def test_n_adds_the_own_relations_templates_as_positives(tiny_model, tokenizer):
    facts = [KNOWN, UNKNOWN]
    zero, _ = examples(tiny_model, tokenizer, facts, tiny_params(0))
    ex, run = examples(tiny_model, tokenizer, facts, tiny_params(2))
    n0 = len(zero.pos.ids)
    assert len(ex.pos.ids) == n0 + 2 and torch.equal(ex.pos.ids[:n0, :zero.pos.ids.shape[1]], zero.pos.ids)
    assert ex.pos.fact[n0:].tolist() == [0, 0]      # both for the recognised fact, none for the other
    texts = [t.format(subject=KNOWN.subject) for t in own_relation(KNOWN, load_training_templates())[2][:2]]
    wanted = encode(tokenizer, [(t, KNOWN.target_new, KNOWN.subject, 0) for t in texts])
    width = wanted.ids.shape[1]
    assert torch.equal(ex.pos.ids[n0:, :width], wanted.ids)
    assert torch.equal(ex.pos.target_mask[n0:, :width], wanted.target_mask)   # the edit loss reads them
    assert (ex.pos.subject_pos[n0:] >= 0).all()
    # The question gates are calibrated on them too (without them, on the prompts alone).
    assert ex.question_rows(2).tolist() == ex.plain_rows(2).tolist() + [n0, n0 + 1]
    assert torch.equal(zero.question_rows(2), zero.plain_rows(2))
    # The question gate opens on them at their answer positions, for the fact's own bases only.
    fz = _frozen_states(tiny_model, tokenizer, ex, run, None)
    _, owner = _new_block(tiny_model, tokenizer, 2, ex, fz, run)
    opened = _gate_targets(facts, ex, fz, owner, run).question[0][1].cpu()
    # Open rows: every answer position of the positives in row order, then the swapped prompts.
    k = int(ex.pos.target_mask[n0:].sum())
    assert k > 0
    templates_open = opened[int(ex.pos.target_mask.sum()) - k:int(ex.pos.target_mask.sum())]
    assert torch.equal(templates_open, (owner == 0).expand(k, -1))


def test_training_with_relation_positives_runs(tiny_model, tokenizer):
    s = edit(tiny_model, tokenizer, [KNOWN, UNKNOWN], tiny_params(3), progress=False)
    iv = s.blocks[0].interventions[2]
    assert iv.query and iv.rank == 4


def test_template_wordings_stay_apart_from_the_gate_probes():
    probes = yaml.safe_load((TRAINING_TEMPLATES.parent / "relation-templates.yaml").read_text())["relations"]
    reserved = {t.strip().casefold() for r in probes.values() for t in r["templates"]}
    assert not reserved & {t.strip().casefold() for _, _, ts in load_training_templates() for t in ts}
    assert relation_positive_items([KNOWN], 0, load_training_templates()) == []

"""``ledit why``'s core (editing/provenance.py) on the tiny Llama, with gates set by hand: a
basis forced open names its fact, one forced shut names none, each basis maps to its own
block and fact, and sets without gates are refused."""
from __future__ import annotations

import pytest
import torch

from editing import AdapterError, AdapterSet, BaFTIntervention, Block
from editing.provenance import basis_facts, explain

LAYER, GATE = 2, 1


def block(model, fact_ids: list[str], owner: list[int], open_bias: list[float]) -> Block:
    iv = BaFTIntervention(model.config.hidden_size, len(owner), gated=True, gate_layer=GATE)
    with torch.no_grad():
        iv.W.copy_(iv.R)                   # the edit itself does nothing: only the gates are read
        iv.c.copy_(torch.tensor(open_bias))
    iv.requires_grad_(False)
    records = [{"fact_id": f, "subject": f"subject {f}", "target_new": f"target {f}"} for f in fact_ids]
    return Block(fact_ids=fact_ids, records=records, interventions={LAYER: iv}, owner=torch.tensor(owner))


def test_an_open_basis_names_its_fact_and_a_shut_one_names_none(tiny_model, tokenizer):
    s = AdapterSet.for_model(tiny_model, "baft")
    s.add_block(block(tiny_model, ["a", "b"], [0, 0, 1, 1], [-50.0, -50.0, -50.0, -50.0]))
    s.add_block(block(tiny_model, ["c"], [0, 0], [-50.0, 50.0]))          # c's second basis: open
    assert basis_facts(s, LAYER) == [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0)]

    out = explain(tiny_model, tokenizer, s, "The capital of France is", max_new_tokens=3, threshold=0.5)
    assert [f["fact_id"] for f in out["firings"]] == ["c"]
    fired = out["firings"][0]
    assert fired["weight"] > 0.99 and fired["subject"] == "subject c" and fired["target_new"] == "target c"
    # the first token is an attention sink that never counts (baft.causal_pool): the next opens
    assert (fired["position"], fired["phase"]) == (1, "prompt")
    assert fired["block_id"] == s.blocks[1].block_id
    assert isinstance(out["answer"], str)

    s.blocks[1].interventions[LAYER].c.fill_(-50.0)
    assert explain(tiny_model, tokenizer, s, "The capital of France is", 3, 0.5)["firings"] == []


def test_sets_without_gates_cannot_be_traced(tiny_model, tokenizer):
    for method in ("reft", "lora"):
        with pytest.raises(AdapterError, match="no gates"):
            explain(tiny_model, tokenizer, AdapterSet.for_model(tiny_model, method), "x", 2, 0.5)

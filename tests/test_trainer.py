"""The trainer's mechanics on a tiny random Llama (quality is measured in bench/)."""
import pytest
import torch

from editing import Fact, edit
from editing.examples import encode
from editing.trainer import Trunk, residual_at
from tasks.settings import load_settings

FACTS = [
    Fact(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target_new="English"),
    Fact(subject="Toko Yasuda", prompt="Toko Yasuda plays the", target_new="piano"),
]


def tiny_params(method="baft", baft=None, **over):
    """params.yaml's edit section for the tiny model, with ``over`` and ``baft`` laid over it."""
    return load_settings().edit.override({
        "method": method, "layers": [2], "steps": 6, "batch_size": 8, **over,
        "baft": {"gate_layer": 1, "prefixes": 2, "prefix_tokens": 3, "subject_swaps": 1, **(baft or {})}})


def test_training_is_seeded_and_deterministic(tiny_model, tokenizer):
    a = edit(tiny_model, tokenizer, FACTS, tiny_params(), progress=False)
    b = edit(tiny_model, tokenizer, FACTS, tiny_params(), progress=False)
    c = edit(tiny_model, tokenizer, FACTS, tiny_params(seed=1), progress=False)
    ta, tb, tc = a.tensors(), b.tensors(), c.tensors()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_training_lowers_the_edit_loss_and_keeps_bases_orthonormal(tiny_model, tokenizer):
    p = tiny_params(steps=30, lr=0.05, early_stop={"check_every": 31})   # never stop early
    s = edit(tiny_model, tokenizer, FACTS, p, progress=False)
    block = s.blocks[0]
    assert block.stats["steps"] == 30 and not block.stats["stopped_early"]
    iv = block.interventions[2]
    assert iv.rank == 2 * p.baft.bases_per_edit and iv.gate_layer == 1
    assert torch.allclose(iv.R @ iv.R.T, torch.eye(iv.rank), atol=1e-4)
    assert block.owner.tolist() == [0, 0, 1, 1]

    def target_loss(attach):
        enc = encode(tokenizer, [(f.prompt, f.target_new, f.subject, i) for i, f in enumerate(FACTS)])
        handle = attach(tiny_model) if attach else None
        try:
            logits = tiny_model(input_ids=enc.ids).logits
        finally:
            if handle:
                handle.remove()
        labels = torch.roll(enc.ids, -1, 1)[enc.target_mask]
        return torch.nn.functional.cross_entropy(logits[enc.target_mask], labels).item()
    # a random 64-wide model cannot become confident over 49k tokens; it must still move
    assert target_loss(s.attach) < target_loss(None) - 1.0


def test_reft_switch_trains_no_gate(tiny_model, tokenizer):
    s = edit(tiny_model, tokenizer, FACTS, tiny_params("reft"), progress=False)
    iv = s.blocks[0].interventions[2]
    assert not iv.gated and iv.gate_layer is None
    h = torch.randn(3, 64)
    assert torch.equal(iv.weights(h), torch.ones(3, iv.rank))


def test_lora_baseline_restores_the_base_model(tiny_model, tokenizer):
    ids = tokenizer(["Toko Yasuda plays the"], return_tensors="pt").input_ids
    bare = tiny_model(ids).logits
    s = edit(tiny_model, tokenizer, FACTS, tiny_params("lora"), progress=False)
    assert torch.equal(tiny_model(ids).logits, bare)            # peft unloaded cleanly
    assert set(s.blocks[0].lora) == {2}
    with s.attach(tiny_model):
        assert not torch.allclose(tiny_model(ids).logits, bare)


def test_trunk_resumes_from_the_cached_residual(tiny_model, tokenizer):
    ids = tokenizer(["The mother tongue of Danielle Darrieux is English"], return_tensors="pt").input_ids
    full = tiny_model.model(input_ids=ids).last_hidden_state
    cached = residual_at(tiny_model, ids, (2,))[0]
    assert torch.allclose(Trunk(tiny_model, 2).states(ids, cached), full, atol=1e-5)


def test_gate_layer_must_precede_the_edit_layer(tiny_model, tokenizer):
    p = tiny_params(baft={"gate_layer": 3})
    with pytest.raises(ValueError, match="gate_layer"):
        edit(tiny_model, tokenizer, FACTS, p, progress=False)


def test_continuation_loss_keeps_the_base_models_next_tokens(tiny_model, tokenizer):
    p = tiny_params(steps=4, baft={"continuation_tokens": 3}, loss_weights={"continuation": 1.0})
    from editing.examples import base_continuations, positive_items

    conts = base_continuations(tiny_model, tokenizer, FACTS, 3)
    enc = encode(tokenizer, positive_items(FACTS, [], conts))
    assert enc.keep_mask.sum(1).tolist() == [
        len(tokenizer(f.prompt + " " + f.target_new + c)["input_ids"])
        - len(tokenizer(f.prompt + " " + f.target_new)["input_ids"]) for f, c in zip(FACTS, conts)]
    assert not (enc.keep_mask & enc.target_mask).any()
    s = edit(tiny_model, tokenizer, FACTS, p, progress=False)
    assert s.blocks[0].stats["steps"] >= 1


def test_training_without_prefixes_keys_from_the_prompt(tiny_model, tokenizer):
    p = tiny_params(steps=2, baft={"prefixes": 0})
    s = edit(tiny_model, tokenizer, FACTS, p, progress=False)
    assert s.blocks[0].interventions[2].rank == 2 * p.baft.bases_per_edit


def test_gate_margin_moves_every_new_bias_down_and_nothing_else(tiny_model, tokenizer):
    p = tiny_params(baft={"gate_margin": 0.0, "gate_ceiling": None})
    plain = edit(tiny_model, tokenizer, FACTS, p, progress=False).blocks[0].interventions[2]
    p = p.override({"baft": {"gate_margin": 1.5}})
    shut = edit(tiny_model, tokenizer, FACTS, p, progress=False).blocks[0].interventions[2]
    assert torch.allclose(shut.c, plain.c - 1.5)
    for name in ("R", "W", "b", "G"):
        assert torch.equal(getattr(shut, name), getattr(plain, name))
    h = torch.randn(4, plain.hidden_size)
    assert (shut.weights(h) < plain.weights(h)).all()


def test_gate_ceiling_caps_each_basis_on_its_own_prompt(tiny_model, tokenizer):
    from editing.baft import causal_pool

    p = tiny_params(steps=20, lr=0.05, baft={"gate_margin": 0.0, "gate_ceiling": None})
    free = edit(tiny_model, tokenizer, FACTS, p, progress=False).blocks[0]
    p = p.override({"baft": {"gate_margin": 0.5, "gate_ceiling": -1.0}})
    capped = edit(tiny_model, tokenizer, FACTS, p, progress=False).blocks[0]
    a, b = free.interventions[2], capped.interventions[2]
    for name in ("R", "W", "b", "G"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    shift = a.c - b.c
    assert (shift >= 0.5 - 1e-5).all()
    # On its own fact's prompt no basis opens by more than the ceiling (or the margin's worth less).
    enc = encode(tokenizer, [(f.prompt, None, None, -1) for f in FACTS])
    h = residual_at(tiny_model, enc.ids, (1,))[0]
    valid = torch.arange(h.shape[1])[None, :] < enc.lengths[:, None]
    for iv, in_logits in ((a, False), (b, True)):
        pooled = causal_pool(iv.weights(h), valid)[torch.arange(len(FACTS)), enc.lengths - 1]
        own = pooled[capped.owner, torch.arange(iv.rank)]
        if in_logits:
            assert (torch.logit(own) <= -1.0 + 1e-4).all()
            # where the ceiling did not bind, the shift is the margin alone
            free_own = torch.logit(own) + shift
            assert torch.allclose(shift[free_own - 0.5 <= -1.0], torch.tensor(0.5))
        else:
            assert (torch.logit(own) > -1.0).any(), "the test needs some gate above the ceiling"


def test_model_written_texts_join_the_negatives(tiny_model, tokenizer):
    import random

    from editing.examples import TEXT_STARTERS, model_prefixes, negative_items

    texts = model_prefixes(tiny_model, tokenizer, 3, 4, seed=1, starters=TEXT_STARTERS)
    assert len(texts) == 3 and all(texts)
    items = negative_items(FACTS, 1, random.Random(0), texts=texts)
    generic = [text for text, _, subject, fact in items if fact == -1 and subject is None]
    assert set(texts) <= set(generic)
    p = tiny_params(steps=2, baft={"text_negatives": 3})
    assert edit(tiny_model, tokenizer, FACTS, p, progress=False).blocks[0].interventions[2].rank == 4

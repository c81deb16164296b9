"""Lifelong operations on an adapter set, on a tiny random Llama: extend, supersede,
retract, block rollback, consolidation, and the refusals."""
import json

import pytest
import torch
from conftest import make_tiny_llama
from test_trainer import tiny_params

from editing import AdapterError, AdapterSet, Fact, edit
from editing.adapters import UnknownFactError
from editing.editor import newest_per_fact

A = Fact(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target_new="English")
B = Fact(subject="Toko Yasuda", prompt="Toko Yasuda plays the", target_new="piano")
C = Fact(subject="Autonomous University of Madrid", prompt="Autonomous University of Madrid is in",
         target_new="Sweden")
D = Fact(subject="Thomas Joannes Stieltjes", prompt="Thomas Joannes Stieltjes was born in", target_new="Rome")
PROBES = [f.prompt for f in (A, B, C, D)] + ["The weather today is mild."]


def params(method="baft"):
    return tiny_params(method, steps=2)


def logits(model, tokenizer, adapter_set=None):
    enc = tokenizer(PROBES, return_tensors="pt", padding=True)
    handle = adapter_set.attach(model) if adapter_set is not None else None
    try:
        return model(**enc).logits
    finally:
        if handle is not None:
            handle.remove()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return make_tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def three_blocks(tiny_model, tokenizer):
    s1 = edit(tiny_model, tokenizer, [A, B], params(), progress=False, training_run="night-1")
    s2 = edit(tiny_model, tokenizer, [C], params(), base=s1, progress=False, training_run="night-2")
    s3 = edit(tiny_model, tokenizer, [D], params(), base=s2, progress=False, training_run="night-3")
    return s1, s2, s3


def test_extend_appends_a_block_and_leaves_the_base_alone(three_blocks):
    s1, s2, s3 = three_blocks
    assert [len(s.blocks) for s in three_blocks] == [1, 2, 3]
    assert s3.fact_ids == [A.fact_id, B.fact_id, C.fact_id, D.fact_id]
    assert s3.blocks[0] is s1.blocks[0] and s3.changes["added"] == [D.fact_id]
    assert [b.training_run for b in s3.blocks] == ["night-1", "night-2", "night-3"]
    assert [f.target_new for f in s3.facts()] == ["English", "piano", "Sweden", "Rome"]


def test_supersede_in_a_later_batch_by_id_and_by_subject_and_prompt(tiny_model, tokenizer, three_blocks):
    s3 = three_blocks[2]
    by_id = edit(tiny_model, tokenizer, [Fact(subject=B.subject, prompt=B.prompt, target_new="violin")],
                 params(), base=s3, progress=False)
    assert by_id.changes["superseded"] == [B.fact_id]
    assert [f.target_new for f in by_id.facts() if f.fact_id == B.fact_id] == ["violin"]
    # Another id, same normalised subject and prompt: still the same fact.
    same = Fact(subject="toko  YASUDA", prompt="Toko Yasuda plays   the", target_new="drums", fact_id="crm-77")
    by_key = edit(tiny_model, tokenizer, [same], params(), base=by_id, progress=False)
    assert by_key.changes["superseded"] == [B.fact_id]
    live = {f.fact_id: f.target_new for f in by_key.facts()}
    assert live == {A.fact_id: "English", C.fact_id: "Sweden", D.fact_id: "Rome", "crm-77": "drums"}
    assert by_key.blocks[0].owner.tolist() == [0, 0]      # B's bases left its block


def test_supersede_within_one_batch_keeps_the_newest():
    old, new = Fact(subject="X", prompt="X is in", target_new="Paris"), Fact(subject="X", prompt="X is in",
                                                                             target_new="Rome")
    assert newest_per_fact([old, B, new]) == [B, new]
    assert newest_per_fact([new, Fact(subject="x", prompt="x  is in", target_new="Oslo", fact_id="k")])[0].target_new == "Oslo"


def test_supersede_within_one_batch_trains_only_the_newest(tiny_model, tokenizer):
    s = edit(tiny_model, tokenizer, [A, Fact(subject=A.subject, prompt=A.prompt, target_new="Dutch")],
             params(), progress=False)
    assert [f.target_new for f in s.facts()] == ["Dutch"] and s.blocks[0].owner.tolist() == [0, 0]


def test_retract_removes_exactly_that_edit(tiny_model, tokenizer, three_blocks):
    s3 = three_blocks[2]
    out = edit(tiny_model, tokenizer, [Fact(subject="", prompt="", target_new="", fact_id=B.fact_id,
                                            op="retract")], params(), base=s3, progress=False)
    assert out.changes == {"added": [], "superseded": [], "retracted": [B.fact_id], "block_id": None}
    assert B.fact_id not in out.fact_ids and len(out.blocks) == 3
    # The same set with B's basis terms zeroed in place: delta = W h + b - R h = 0.
    zeroed = s3.copy()
    first = s3.blocks[0]
    block = type(first)(fact_ids=first.fact_ids, owner=first.owner, block_id=first.block_id)
    for L, iv in first.interventions.items():
        z = iv.select(torch.arange(iv.rank))
        rows = first.owner == 1
        with torch.no_grad():
            z.W[rows] = z.R[rows]
            z.b[rows] = 0
        block.interventions[L] = z
    zeroed.blocks[0] = block
    assert torch.allclose(logits(tiny_model, tokenizer, out), logits(tiny_model, tokenizer, zeroed), atol=1e-5)


def test_retracting_every_fact_of_a_block_drops_the_block(tiny_model, tokenizer, three_blocks):
    s1, s2, s3 = three_blocks
    out = s3.retract([C.fact_id])
    assert [b.block_id for b in out.blocks] == [s3.blocks[0].block_id, s3.blocks[2].block_id]


def test_unknown_retract_is_reported_and_changes_nothing(tiny_model, tokenizer, three_blocks):
    s3 = three_blocks[2]
    before = s3.tensors()
    with pytest.raises(UnknownFactError, match="f-nope") as err:
        edit(tiny_model, tokenizer, [Fact(subject="", prompt="", target_new="", fact_id="f-nope",
                                          op="retract"), Fact(subject="Q", prompt="Q is", target_new="R")],
             params(), base=s3, progress=False)
    assert err.value.fact_ids == ["f-nope"]
    assert all(torch.equal(before[k], v) for k, v in s3.tensors().items())
    # Retracting a fact upserted earlier in the same batch is not unknown.
    out = edit(tiny_model, tokenizer, [A, Fact(subject=A.subject, prompt=A.prompt, target_new="", op="retract")],
               params(), progress=False)
    assert out.blocks == [] and out.changes["added"] == []


def test_block_rollback_restores_outputs_exactly(tiny_model, tokenizer, three_blocks):
    s1, s2, s3 = three_blocks
    assert torch.equal(logits(tiny_model, tokenizer, s3.rollback(s3.blocks[2].block_id)),
                       logits(tiny_model, tokenizer, s2))
    assert torch.equal(logits(tiny_model, tokenizer, s2.rollback(s2.blocks[1].block_id)),
                       logits(tiny_model, tokenizer, s1))
    bare = s1.rollback(s1.blocks[0].block_id)
    assert bare.blocks == [] and torch.equal(logits(tiny_model, tokenizer, bare), logits(tiny_model, tokenizer))
    with pytest.raises(AdapterError, match="no block"):
        s3.rollback("nope")


def test_consolidation_is_one_module_with_identical_outputs(tiny_model, tokenizer, three_blocks, tmp_path):
    s3 = three_blocks[2]
    merged = s3.consolidate()
    assert len(merged.blocks) == 1 and merged.fact_ids == s3.fact_ids
    assert merged.blocks[0].interventions[2].rank == sum(b.interventions[2].rank for b in s3.blocks)
    assert [x["block_id"] for x in merged.blocks[0].stats["consolidated_from"]] == [b.block_id for b in s3.blocks]
    assert torch.allclose(logits(tiny_model, tokenizer, merged), logits(tiny_model, tokenizer, s3), atol=1e-6)
    with merged.attach(tiny_model) as handle:
        assert len(handle.modules) == 1 and len(handle.hooks) == 3   # mask, gate, content
    # Still a set: facts retract from it, and it saves and loads.
    loaded = AdapterSet.load(merged.retract([C.fact_id]).save(tmp_path / "merged"))
    assert loaded.fact_ids == [A.fact_id, B.fact_id, D.fact_id]
    assert torch.allclose(logits(tiny_model, tokenizer, loaded),
                          logits(tiny_model, tokenizer, s3.retract([C.fact_id])), atol=1e-6)


def test_lora_sets_consolidate_and_refuse_single_fact_retracts(tiny_model, tokenizer):
    s = edit(tiny_model, tokenizer, [A, B], params("lora"), progress=False)
    s = edit(tiny_model, tokenizer, [C], params("lora"), base=s, progress=False)
    assert torch.allclose(logits(tiny_model, tokenizer, s.consolidate()), logits(tiny_model, tokenizer, s), atol=1e-5)
    with pytest.raises(AdapterError, match="LoRA"):
        s.retract([A.fact_id])
    assert s.retract([C.fact_id]).fact_ids == [A.fact_id, B.fact_id]


def test_extending_a_set_of_another_base_is_refused(tiny_model, tokenizer, three_blocks):
    other = make_tiny_llama(len(tokenizer), seed=1)
    with pytest.raises(AdapterError, match="fingerprint"):
        edit(other, tokenizer, [C], params(), base=three_blocks[0], progress=False)
    with pytest.raises(AdapterError, match="cannot extend a baft"):
        edit(tiny_model, tokenizer, [C], params("reft"), base=three_blocks[0], progress=False)


def test_records_survive_save_and_load(three_blocks, tmp_path):
    s3 = three_blocks[2]
    loaded = AdapterSet.load(s3.save(tmp_path / "set"))
    assert [f.to_dict() for f in loaded.facts()] == [f.to_dict() for f in s3.facts()]
    assert loaded.locate(Fact(subject="danielle darrieux", prompt=A.prompt.upper(), target_new="x")) == [(0, 0)]


def test_adapter_commands(three_blocks, tmp_path):
    from click.testing import CliRunner

    from flows.cli import main
    s3 = three_blocks[2]
    src = str(s3.save(tmp_path / "set"))
    run = CliRunner().invoke
    shown = json.loads(run(main, ["adapter", "show", src, "--json"]).stdout)
    assert [b["block_id"] for b in shown["blocks"]] == [b.block_id for b in s3.blocks]
    assert run(main, ["adapter", "retract", src, B.fact_id, "--out", str(tmp_path / "r")]).exit_code == 0
    assert AdapterSet.load(tmp_path / "r").fact_ids == [A.fact_id, C.fact_id, D.fact_id]
    assert run(main, ["adapter", "drop-block", src, s3.blocks[1].block_id, "--out", str(tmp_path / "d")]).exit_code == 0
    assert AdapterSet.load(tmp_path / "d").fact_ids == [A.fact_id, B.fact_id, D.fact_id]
    assert run(main, ["adapter", "consolidate", src, "--out", str(tmp_path / "c")]).exit_code == 0
    assert len(AdapterSet.load(tmp_path / "c").blocks) == 1
    unknown = run(main, ["adapter", "retract", src, "f-missing", "--out", str(tmp_path / "u")])
    assert unknown.exit_code == 2 and "f-missing" in unknown.stderr and not (tmp_path / "u").exists()
    weights = tmp_path / "set" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    refused = run(main, ["adapter", "show", src])
    assert refused.exit_code == 2 and "checksum" in refused.stderr


def test_a_new_block_trains_beside_the_set_as_it_will_run(three_blocks):
    from editing.trainer import _SideBySide
    old, new = three_blocks[0].blocks[0].interventions[2], three_blocks[1].blocks[1].interventions[2]
    h = torch.randn(2, 5, 64)
    stacked = type(old).stack([old, new])
    s = stacked.weights(h)
    with torch.no_grad():
        assert torch.allclose(_SideBySide(old, new)(h, s), stacked(h, s), atol=1e-5)


def test_cli_edit_applies_retracts_on_a_base_adapter(three_blocks, tiny_dir, tmp_path):
    from click.testing import CliRunner

    from flows.cli import main
    src = str(three_blocks[2].save(tmp_path / "set"))
    retract = tmp_path / "retract.jsonl"
    retract.write_text(json.dumps({"op": "retract", "fact_id": B.fact_id}) + "\n")
    out = CliRunner().invoke(main, ["edit", str(retract), "--base-adapter", src, "--model", tiny_dir,
                                    "--out", str(tmp_path / "out"), "--quiet"])
    assert out.exit_code == 0, out.output
    assert "retracted 1" in out.stdout and "3 live edits" in out.stdout
    assert B.fact_id not in AdapterSet.load(tmp_path / "out").fact_ids
    retract.write_text(json.dumps({"op": "retract", "fact_id": "f-unknown"}) + "\n")
    bad = CliRunner().invoke(main, ["edit", str(retract), "--base-adapter", src, "--model", tiny_dir,
                                    "--out", str(tmp_path / "bad"), "--quiet"])
    assert bad.exit_code == 2 and "f-unknown" in bad.stderr and not (tmp_path / "bad").exists()

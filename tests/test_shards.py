"""Scale-out: a batch split into shards, each trained as a block on top of the production
set, composed into one set; 2 shards on a local Ray instance (CPU) under Prefect."""
import contextlib
import pytest
import torch

from editing import AdapterError, AdapterSet, Fact, edit, load_model
from tasks.pipeline.shards import compose, load_shard, split_into_shards, train_shard, train_shards
from tasks.settings import load_settings

PICASSO = Fact(subject="Pablo Picasso", prompt="Pablo Picasso was a", target_new="chef")
MESSI = Fact(subject="Lionel Messi", prompt="Lionel Messi plays for", target_new="Chelsea")
EINSTEIN = Fact(subject="Albert Einstein", prompt="Albert Einstein was born in", target_new="Rome")
FACTS = [
    Fact(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target_new="English"),
    Fact(subject="Toko Yasuda", prompt="Toko Yasuda plays the", target_new="piano"),
    Fact(subject="Pablo Picasso", prompt="Pablo Picasso was a", target_new="pilot"),   # supersedes
    Fact(subject="danielle darrieux", prompt="Danielle Darrieux was born in", target_new="Paris"),
]


def tiny_settings(tiny_dir=None):
    """params.yaml with a tiny edit; the model ``tiny_dir`` where given."""
    return load_settings(overrides={
        "edit": {"layers": [2], "steps": 4, "batch_size": 8,
                 "baft": {"gate_layer": 1, "prefixes": 1, "prefix_tokens": 3, "subject_swaps": 1}},
        **({"model": {"name": tiny_dir}} if tiny_dir else {})})


def test_split_keeps_a_subject_and_a_fact_id_together():
    again = Fact(subject="Someone else", prompt="x", target_new="y", fact_id=FACTS[1].fact_id)
    facts = FACTS + [again]
    shards = split_into_shards(facts, 2)
    assert split_into_shards(facts, 2) == shards
    assert sorted(f.fact_id for s in shards for f in s) == sorted(f.fact_id for f in facts)
    where = {id(f): i for i, s in enumerate(shards) for f in s}
    assert where[id(FACTS[0])] == where[id(FACTS[3])]           # same normalised subject
    assert where[id(FACTS[1])] == where[id(again)]               # same fact_id
    assert sorted(len(s) for s in shards) == [2, 3]
    assert len(split_into_shards(FACTS[:1], 4)) == 1             # never an empty shard
    assert [f.fact_id for f in split_into_shards(FACTS, 1)[0]] == [f.fact_id for f in FACTS]


@pytest.fixture(scope="module")
def production(tiny_dir, tmp_path_factory):
    """The set in production: three facts in one block, trained in this process."""
    model, tok = load_model(tiny_dir, dtype="float32")
    base = edit(model, tok, [PICASSO, MESSI, EINSTEIN], tiny_settings().edit, progress=False)
    return str(base.save(tmp_path_factory.mktemp("production") / "set"))


def _logits(model, tokenizer, prompts, adapter_set=None):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with adapter_set.attach(model) if adapter_set else contextlib.nullcontext(), torch.no_grad():
        return model(**enc).logits


def test_compose_applies_every_shards_supersedes_and_retracts(tiny_dir, production):
    settings = tiny_settings(tiny_dir)
    a = train_shard([FACTS[1], FACTS[2]], settings.model, settings.edit, production, shard="1/2")
    b = train_shard([Fact(subject="Lionel Messi", prompt="Lionel Messi plays for", target_new="",
                          op="retract")], settings.model, settings.edit, production, shard="2/2")
    assert load_shard(b).blocks == []                            # a retract-only shard trains nothing
    out = compose(AdapterSet.load(production), [a, b])
    assert [blk.fact_ids for blk in out.blocks] == [[EINSTEIN.fact_id], [FACTS[1].fact_id, PICASSO.fact_id]]
    assert out.changes["superseded"] == [PICASSO.fact_id] and out.changes["retracted"] == [MESSI.fact_id]
    assert out.changes["block_ids"] == [out.blocks[1].block_id] == [out.changes["block_id"]]
    assert out.blocks[1].stats["shard"] == "1/2"


@pytest.mark.integration  # a local Ray instance and two worker processes: about a minute
def test_two_shards_on_ray_compose_into_one_set(prefect_api, tiny_dir, production, tmp_path):
    import ray

    settings = tiny_settings(tiny_dir)
    composed = train_shards(FACTS, settings, production, 2, training_run="run-1",
                            data_version="v1", ray_init_kwargs={
                                "num_cpus": 2, "include_dashboard": False,
                                "object_store_memory": 100 * 1024 ** 2, "log_to_driver": False})
    assert not ray.is_initialized()                   # the runner shut down the Ray it started

    base = AdapterSet.load(production)
    shards = split_into_shards(FACTS, 2)
    assert len(shards) == 2 and len(composed.blocks) == 3    # production (less Picasso) + a block per shard
    assert composed.blocks[0].block_id == base.blocks[0].block_id
    assert composed.blocks[0].fact_ids == [MESSI.fact_id, EINSTEIN.fact_id]
    assert [b.fact_ids for b in composed.blocks[1:]] == [[f.fact_id for f in s] for s in shards]
    assert [b.stats["shard"] for b in composed.blocks[1:]] == ["1/2", "2/2"]
    assert {b.training_run for b in composed.blocks[1:]} == {"run-1"}
    assert composed.changes["superseded"] == [PICASSO.fact_id]

    # The same shards trained in this process give the same blocks (up to thread-count noise).
    local = [load_shard(train_shard(s, settings.model, settings.edit, production)).blocks[0] for s in shards]
    for remote_block, block in zip(composed.blocks[1:], local):
        for L, iv in block.interventions.items():
            for name in ("R", "W", "b", "G", "c"):
                assert torch.allclose(getattr(remote_block.interventions[L], name), getattr(iv, name), atol=1e-4)

    model, tok = load_model(tiny_dir, dtype="float32")
    prompts = [f.prompt for f in FACTS]
    bare = _logits(model, tok, prompts)
    out = _logits(model, tok, prompts, composed)
    trimmed = base.retract([PICASSO.fact_id])
    manual = AdapterSet(base.base_model, base.base_fingerprint, base.method, trimmed.blocks + local)
    assert torch.allclose(out, _logits(model, tok, prompts, manual), atol=1e-4)
    for s, block in zip(shards, local):               # each shard's prompts move, as with its own block
        rows = [prompts.index(f.prompt) for f in s]
        alone = _logits(model, tok, prompts, AdapterSet(base.base_model, base.base_fingerprint, base.method,
                                                        trimmed.blocks + [block]))
        assert not torch.allclose(alone[rows], bare[rows])
        assert not torch.allclose(out[rows], bare[rows])

    composed.save(tmp_path / "composed")
    again = AdapterSet.load(tmp_path / "composed")
    assert [b.block_id for b in again.blocks] == [b.block_id for b in composed.blocks]
    assert torch.equal(_logits(model, tok, prompts, again), out)


def test_compose_adopts_a_centre_off_by_float_noise_only(production, tmp_path):
    def result(delta):
        s = AdapterSet.load(production)
        with torch.no_grad():
            for iv in s.blocks[0].interventions.values():
                iv.center.add_(delta * iv.center.abs().max())
        s.save(tmp_path / "shard")
        return {"files": {p.name: p.read_bytes() for p in (tmp_path / "shard").iterdir()},
                "removed": [], "changes": {}}

    base = AdapterSet.load(production)
    out = compose(base, [result(1e-7)])
    assert len(out.blocks) == 2 and len(out.interventions()) == 1      # stacks
    assert torch.equal(out.blocks[1].interventions[2].center, base.blocks[0].interventions[2].center)
    with pytest.raises(AdapterError, match="gate centres"):
        compose(base, [result(1e-2)])

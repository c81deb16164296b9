"""The editing engine on a tiny random Llama: intervention maths, hooks, adapter sets."""
import json

import pytest
import torch

from conftest import make_tiny_llama
from editing import AdapterError, AdapterSet, BaFTIntervention, Block
from editing.attach import attach_interventions


def _random_intervention(hidden, rank, gated=True, seed=0, gate_layer=None):
    torch.manual_seed(seed)
    iv = BaFTIntervention(hidden, rank, gated=gated, gate_layer=gate_layer)
    with torch.no_grad():
        iv.W.normal_(0, 0.3)
        iv.b.normal_(0, 1.0)
        iv.G.normal_(0, 3.0)
        iv.c.normal_(0, 1.0)
    return iv.requires_grad_(False)


def test_reft_equals_baft_with_all_weights_at_one():
    baft = _random_intervention(32, 4, gated=True)
    reft = BaFTIntervention(32, 4, gated=False)
    with torch.no_grad():
        for name in ("R", "W", "b"):
            getattr(reft, name).copy_(getattr(baft, name))
        baft.G.zero_()
        baft.c.fill_(100.0)  # sigmoid(100) == 1.0 exactly in float32
    h = torch.randn(3, 7, 32)
    assert torch.equal(baft.weights(h), torch.ones(3, 7, 4))
    assert torch.allclose(baft(h), reft(h), atol=0, rtol=0)
    # and with real gates the two differ
    baft.c.fill_(-2.0)
    assert not torch.allclose(baft(h), reft(h))


def test_loreft_formula_and_identity_at_init():
    reft = _random_intervention(16, 3, gated=False)
    h = torch.randn(5, 16)
    R, W, b = reft.R, reft.W, reft.b
    expected = h + (h @ W.T + b - h @ R.T) @ R
    assert torch.allclose(reft(h), expected, atol=1e-6)
    fresh = BaFTIntervention(16, 3)
    with torch.no_grad():
        fresh.W.copy_(fresh.R)
    assert torch.allclose(fresh(h), h, atol=1e-6)


def test_gate_keys_open_on_key_and_close_elsewhere():
    iv = BaFTIntervention(64, 2, sharpness=30, threshold=0.8)
    keys = torch.randn(2, 64)
    iv.init_keys(keys)
    s_own = iv.weights(keys * 3.0)           # scale does not matter
    s_other = iv.weights(torch.randn(8, 64))
    assert s_own.diagonal().min() > 0.99
    assert s_other.max() < 0.01


def test_causal_pool_masks_padding_and_carries_the_past():
    from editing.baft import causal_pool

    s = torch.tensor([[[0.9], [0.2], [0.1]], [[0.1], [0.5], [0.3]]])
    valid = torch.tensor([[False, True, True], [True, True, True]])
    pooled = causal_pool(s, valid)
    # padding and each row's first real token (an attention sink) have no say
    assert torch.allclose(pooled[:, :, 0], torch.tensor([[0.0, 0.0, 0.1], [0.0, 0.5, 0.5]]))
    carried = causal_pool(s[:, -1:], None, past=pooled[:, -1])
    assert torch.allclose(carried[:, 0, 0], torch.tensor([0.1, 0.5]))


def test_stack_equals_sum_of_blocks():
    a, b = _random_intervention(32, 3, seed=1), _random_intervention(32, 5, seed=2)
    h = torch.randn(4, 6, 32)
    summed = h + (a(h) - h) + (b(h) - h)
    assert torch.allclose(BaFTIntervention.stack([a, b])(h), summed, atol=1e-5)


# gate_layer=None: weights read h itself; 0: read at layer 0 and pooled causally.
@pytest.mark.parametrize("gate_layer", [None, 0])
def test_hooks_with_left_padding(tiny_model, tokenizer, gate_layer):
    iv = _random_intervention(64, 4, gate_layer=gate_layer)
    texts = ["The capital of France is", "Hello"]
    with attach_interventions(tiny_model, {1: iv}):
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        batched = tiny_model(**enc).logits
        for i, text in enumerate(texts):
            alone = tiny_model(**tokenizer([text], return_tensors="pt")).logits[0]
            n = alone.shape[0]
            assert torch.allclose(batched[i, -n:], alone, atol=1e-4)
    # the intervention really changed something
    assert not torch.allclose(tiny_model(**enc).logits, batched, atol=1e-3)


@pytest.mark.parametrize("gate_layer", [None, 1])
def test_hooks_with_kv_cache(tiny_model, tokenizer, gate_layer):
    iv = _random_intervention(64, 4, gate_layer=gate_layer)
    enc = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with attach_interventions(tiny_model, {2: iv}):
        cached = tiny_model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id)
        uncached = tiny_model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False,
                                       pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(cached, uncached)
        # incremental logits equal a full forward over the same tokens
        ids = tokenizer(["The capital of France is Paris"], return_tensors="pt").input_ids
        full = tiny_model(ids).logits
        head = tiny_model(ids[:, :-2], use_cache=True)
        tail = tiny_model(ids[:, -2:], past_key_values=head.past_key_values).logits
        assert torch.allclose(tail, full[:, -2:], atol=1e-4)


def _adapter_set(model, layers=(1, 2), blocks=2):
    s = AdapterSet.for_model(model, "baft")
    for k in range(blocks):
        ivs = {L: _random_intervention(64, 3, seed=10 * k + L) for L in layers}
        s.add_block(Block(fact_ids=[f"f{k}"], interventions=ivs, owner=torch.zeros(3, dtype=torch.long)))
    return s


def test_save_load_attach_reproduces_logits_exactly(tiny_model, tokenizer, tmp_path):
    s = _adapter_set(tiny_model)
    ids = tokenizer(["Paris is the capital of"], return_tensors="pt").input_ids
    with s.attach(tiny_model):
        before = tiny_model(ids).logits
    s.save(tmp_path / "set")
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert manifest["base_fingerprint"] == s.base_fingerprint
    assert manifest["weights"]["file"].endswith(".safetensors")
    loaded = AdapterSet.load(tmp_path / "set")
    handle = loaded.attach(tiny_model)
    after = tiny_model(ids).logits
    handle.remove()
    assert torch.equal(before, after)
    bare = tiny_model(ids).logits
    assert not torch.allclose(bare, after)


def test_attach_to_mismatched_base_is_refused(tiny_model, tokenizer):
    s = _adapter_set(tiny_model)
    other = make_tiny_llama(len(tokenizer), seed=1)
    with pytest.raises(AdapterError, match="fingerprint"):
        s.attach(other)


def test_corrupted_weights_are_refused(tiny_model, tmp_path):
    _adapter_set(tiny_model).save(tmp_path / "set")
    path = tmp_path / "set" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum"):
        AdapterSet.load(tmp_path / "set")


def test_save_is_atomic(tiny_model, tmp_path, monkeypatch):
    target = tmp_path / "set"
    first = _adapter_set(tiny_model, blocks=1)
    first.save(target)
    original = {p.name: p.read_bytes() for p in target.iterdir()}

    import editing.adapters as adapters

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(adapters, "_write_json", crash)
    with pytest.raises(RuntimeError):
        _adapter_set(tiny_model, blocks=2).save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == original
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no staging left behind
    # a crash on a first save leaves no directory at all
    with pytest.raises(RuntimeError):
        first.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_set_attach_is_one_stacked_module_per_layer(tiny_model, tokenizer):
    s = _adapter_set(tiny_model, layers=(1,), blocks=3)
    ids = tokenizer(["A quick test of stacking"], return_tensors="pt").input_ids
    handle = s.attach(tiny_model)
    assert len(handle.hooks) == 1 and handle.modules[1].rank == 9
    stacked = tiny_model(ids).logits
    handle.remove()
    iv = BaFTIntervention.stack([b.interventions[1] for b in s.blocks])
    with attach_interventions(tiny_model, {1: iv}):
        assert torch.equal(tiny_model(ids).logits, stacked)


def test_blocks_with_different_gate_centres_do_not_stack():
    a, b = _random_intervention(32, 2, seed=1), _random_intervention(32, 2, seed=2)
    b.center.fill_(0.5)
    with pytest.raises(ValueError, match="centre"):
        BaFTIntervention.stack([a, b])


def test_gate_centre_is_saved_and_used(tiny_model, tokenizer, tmp_path):
    s = _adapter_set(tiny_model, blocks=1)
    iv = s.blocks[0].interventions[1]
    iv.center.normal_()
    h = torch.randn(2, 64)
    s.save(tmp_path / "set")
    loaded = AdapterSet.load(tmp_path / "set").blocks[0].interventions[1]
    assert torch.equal(loaded.center, iv.center)
    assert torch.equal(loaded.weights(h), iv.weights(h))

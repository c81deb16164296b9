"""Every model family editing supports, on tiny random models: edit one fact with BaFT, save,
load, attach and generate; the LoRA baseline on a few; a clear refusal for the rest.

A family works when ``editing.architecture`` finds its decoder layers, the residual it
resumes training from gives the model's own final states, and the gates' running maximum
follows the KV cache: logits generated with the cache equal a full forward pass.
"""
import pytest
import torch

from editing import AdapterSet, EditConfig, Fact, UnsupportedModel, architecture, edit

FACT = Fact(subject="Toko Yasuda", prompt="Toko Yasuda plays the", target_new="piano")
# Shared by every family: hidden 64, 3 layers (the gate reads layer 1, the edit is at 2).
SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256)


def _configs():
    import transformers as t
    return {
        "llama": lambda: t.LlamaConfig(**SIZE, num_key_value_heads=2),
        "qwen2": lambda: t.Qwen2Config(**SIZE, num_key_value_heads=2),
        "mistral": lambda: t.MistralConfig(**SIZE, num_key_value_heads=2),
        "gemma2": lambda: t.Gemma2Config(**SIZE, num_key_value_heads=2, head_dim=16),
        "phi3": lambda: t.Phi3Config(**SIZE, num_key_value_heads=4, pad_token_id=0),
        "gpt2": lambda: t.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256),
        "gpt_neox": lambda: t.GPTNeoXConfig(**SIZE),
        "gptj": lambda: t.GPTJConfig(n_embd=64, n_layer=3, n_head=4, n_positions=256, rotary_dim=8),
        "opt": lambda: t.OPTConfig(hidden_size=64, num_hidden_layers=3, ffn_dim=128, num_attention_heads=4,
                                   max_position_embeddings=256, word_embed_proj_dim=64),
        "falcon": lambda: t.FalconConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4),
        "bloom": lambda: t.BloomConfig(hidden_size=64, n_layer=3, n_head=4),
        "mixtral": lambda: t.MixtralConfig(**SIZE, num_key_value_heads=2, num_local_experts=2,
                                           num_experts_per_tok=1),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(**SIZE, num_key_value_heads=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=64, num_experts=2,
                                              num_experts_per_tok=1),
    }


FAMILIES = sorted(_configs())


def tiny(family: str, vocab_size: int):
    from transformers import AutoModelForCausalLM

    config = _configs()[family]()
    config.vocab_size = vocab_size
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.requires_grad_(False)
    model.config.name_or_path = f"tiny-{family}"
    return model


def config(method: str = "baft") -> EditConfig:
    return EditConfig.from_dict({"method": method, "layers": [2], "steps": 3, "batch_size": 8,
                                 "baft": {"gate_layer": 1, "prefixes": 0, "subject_swaps": 1}})


def generated_logits(model, tokenizer, prompt: str, n: int = 3):
    """The logits of ``n`` greedy tokens generated with the KV cache, and the same positions'
    logits from one full forward pass over prompt and answer."""
    enc = tokenizer([prompt], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    cached = torch.stack(out.logits, dim=1)
    width = enc.input_ids.shape[1]
    with torch.no_grad():
        full = model(input_ids=out.sequences[:, :-1], use_cache=False).logits[:, width - 1:]
    return cached, full


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_save_load_attach_generate(family, tokenizer, tmp_path):
    model = tiny(family, len(tokenizer))
    ids = tokenizer([FACT.prompt + " " + FACT.target_new], return_tensors="pt").input_ids
    with torch.no_grad():
        bare = model(ids).logits
        full = architecture.final_states(model, ids)
        resumed = architecture.final_states(model, ids, model(ids, output_hidden_states=True).hidden_states[2], 2)
        assert torch.allclose(resumed, full, atol=1e-5)       # the trainer's frozen-trunk shortcut
        assert torch.allclose(architecture.logits(model, full), bare, atol=1e-5)
    s = edit(model, tokenizer, [FACT], config(), progress=False)
    loaded = AdapterSet.load(s.save(tmp_path / "set"))
    with loaded.attach(model):
        cached, full = generated_logits(model, tokenizer, FACT.prompt)
        edited = model(ids).logits
    assert torch.allclose(cached, full, atol=1e-4)             # the gates follow the KV cache
    assert not torch.allclose(edited, bare)                    # the edit is applied
    assert torch.equal(model(ids).logits, bare)                # detached: the bare model again


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_baseline(family, tokenizer, tmp_path):
    model = tiny(family, len(tokenizer))
    ids = tokenizer([FACT.prompt], return_tensors="pt").input_ids
    bare = model(ids).logits
    s = AdapterSet.load(edit(model, tokenizer, [FACT], config("lora"), progress=False).save(tmp_path / "set"))
    with s.attach(model):
        cached, full = generated_logits(model, tokenizer, FACT.prompt)
        edited = model(ids).logits
    assert torch.allclose(cached, full, atol=1e-4) and not torch.allclose(edited, bare)
    assert torch.equal(model(ids).logits, bare)


def test_lora_needs_a_dense_mlp(tokenizer):
    model = tiny("mixtral", len(tokenizer))
    with pytest.raises(UnsupportedModel, match="MixtralForCausalLM.*dense MLP"):
        edit(model, tokenizer, [FACT], config("lora"), progress=False)


def test_a_model_without_a_kv_cache_is_refused(tokenizer):
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=3,
                                         state_size=4)).eval()
    with pytest.raises(UnsupportedModel, match="MambaForCausalLM"):
        edit(model, tokenizer, [FACT], config(), progress=False)

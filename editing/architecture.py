"""Where a causal LM keeps what editing touches: the one place that knows model layouts.

BaFT rewrites the residual stream entering a decoder layer, the trainer resumes the
decoder from a cached residual above its frozen layers, and the LoRA baseline wraps the
MLP's output projection. Every transformers family names these parts its own way (Llama
``model.layers.N.mlp.down_proj``, GPT-2 ``transformer.h.N.mlp.c_proj``, GPT-NeoX
``gpt_neox.layers``, OPT ``model.decoder.layers.N.fc2``), so the rest of ``editing`` asks
here. A model that cannot be edited is refused with ``UnsupportedModel`` naming its class.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

# Under the trunk (``model.base_model``): where each family keeps its decoder layers.
_LAYER_PATHS = ("layers", "h", "decoder.layers", "blocks")
# Under a decoder layer: the dense MLP output projection (Linear, or GPT-2's Conv1D).
_MLP_OUTPUTS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc_out", "mlp.fc2", "fc2")
# Families whose decoder runs its layers on ``inputs_embeds`` as given (no position
# embeddings, scaling or norm added to it), so training can resume from a cached residual.
# Each is checked against a full run in tests/test_families.py.
RESUMABLE = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "olmo", "olmo2",
                       "phi3", "smollm3", "gpt_neox", "gptj", "falcon"})


class UnsupportedModel(ValueError):
    """A model whose layout editing does not know; the message names its class."""


def _at(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _name(model) -> str:
    return type(model).__name__


def trunk(model) -> nn.Module:
    """The decoder without its head (``LlamaModel``, ``GPT2Model``, ``OPTModel``...)."""
    if hasattr(model, "get_base_model"):        # a peft wrapper
        model = model.get_base_model()
    return getattr(model, "base_model", model)


def _layers_path(body: nn.Module) -> str:
    for path in _LAYER_PATHS:
        try:
            if isinstance(_at(body, path), nn.ModuleList):
                return path
        except AttributeError:
            continue
    raise UnsupportedModel(f"{_name(body)}: cannot find its decoder layers (looked for "
                           f"{', '.join(_LAYER_PATHS)}); editing supports decoder-only causal LMs")


def _holder(model) -> tuple[nn.Module, str]:
    """(the module holding the decoder layers, the attribute they are under)."""
    body = trunk(model)
    parent, _, attr = _layers_path(body).rpartition(".")
    return (_at(body, parent) if parent else body), attr


def decoder(model) -> nn.Module:
    """The module that runs the decoder layers (``LlamaModel``, ``GPT2Model``, OPT's
    ``OPTDecoder``): its calls carry the attention mask and the KV cache, and it returns
    the final-norm hidden states."""
    return _holder(model)[0]


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers, in order; each one's input is the residual stream BaFT edits."""
    holder, attr = _holder(model)
    return getattr(holder, attr)


@functools.lru_cache(maxsize=None)
def _decoder_parameters(cls: type) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.forward).parameters)


def check(model) -> None:
    """Refuse, naming the class, a model editing cannot run on: not a decoder-only LM, no
    decoder layers found, or a decoder without a KV cache (recurrent-state models: the
    gates' running maximum over a generation follows the KV cache)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise UnsupportedModel(f"{_name(model)} is an encoder-decoder model; editing supports "
                               "decoder-only causal LMs")
    decoder_layers(model)
    wanted = {"attention_mask", "past_key_values"}
    if not wanted <= set(_decoder_parameters(type(decoder(model)))):
        raise UnsupportedModel(f"{_name(model)}: its decoder takes no past_key_values and attention_mask "
                               "(a recurrent-state model?); editing supports KV-cache decoders")


def decoder_call(model, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, object]:
    """(attention_mask, past_key_values) of one call of the ``decoder``, by name or position."""
    names = _decoder_parameters(type(decoder(model)))[1:]          # after self
    given = {**dict(zip(names, args)), **kwargs}
    return given.get("attention_mask"), given.get("past_key_values")


def hidden_size(model) -> int:
    """The width of the residual stream."""
    return int(model.config.get_text_config().hidden_size)


def resumable(model) -> bool:
    return getattr(model.config, "model_type", "") in RESUMABLE


def final_states(model, ids: torch.Tensor, cached: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """Final-norm hidden states at every position of ``ids``. Where the family allows it,
    the layers below ``start`` are skipped and the decoder resumes from ``cached``, the
    residual entering layer ``start``; otherwise it runs from the tokens."""
    holder, attr = _holder(model)
    if cached is None or start <= 0 or not resumable(model):
        return holder(input_ids=ids, use_cache=False).last_hidden_state
    full = getattr(holder, attr)
    setattr(holder, attr, nn.ModuleList(list(full)[start:]))
    try:
        return holder(inputs_embeds=cached.to(model.dtype), use_cache=False).last_hidden_state
    finally:
        setattr(holder, attr, full)


def logits(model, states: torch.Tensor) -> torch.Tensor:
    """Next-token logits from final hidden states, as the model's own forward computes
    them (its output head, and Gemma-2's soft cap where set)."""
    out = model.get_output_embeddings()(states)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(out / cap) * cap if cap else out


def mlp_output(model, layer: int) -> tuple[str, nn.Module]:
    """(dotted name in ``model``, module) of the dense MLP output projection of ``layer``:
    what the LoRA baseline wraps. Mixture-of-experts layers have none and are refused."""
    block = decoder_layers(model)[layer]
    for path in _MLP_OUTPUTS:
        try:
            module = _at(block, path)
        except AttributeError:
            continue
        if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2:
            names = {id(m): n for n, m in model.named_modules()}
            return names[id(module)], module
    raise UnsupportedModel(f"{_name(model)}: the LoRA baseline needs a dense MLP output projection "
                           f"(one of {', '.join(_MLP_OUTPUTS)}) in layer {layer}; this model has none "
                           "(mixture of experts?). Use method baft or reft")

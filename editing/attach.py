"""Attaching interventions to named components of a Hugging Face causal LM.

An intervention at layer L rewrites the residual stream entering decoder layer L,
at every position, through a forward pre-hook (pyvene's "block_input").

When its basis weights are read at an earlier ``gate_layer``, a second hook there
computes them and pools them causally (``causal_pool``): padding is masked out
through the attention mask, and during KV-cache decoding the running maximum of
the tokens already seen carries over from one call to the next. So a plain
forward, a left-padded batch and ``generate`` with a KV cache all see one edit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .baft import causal_pool


def decoder_layers(model) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama, Mistral, Qwen, GPT-2 style...)."""
    base = getattr(model, "base_model", model)
    for path in ("model.layers", "layers", "transformer.h", "model.decoder.layers",
                 "gpt_neox.layers"):
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def _rewrite_first(fn):
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs
    return hook


def _inner_model(model) -> nn.Module:
    base = getattr(model, "base_model", model)
    return getattr(base, "model", None) or base.get_decoder()


@dataclass
class GateState:
    """Basis weights pooled at the gate layer, read by the content hook."""
    weights: torch.Tensor | None = None   # (batch, T, rank) for the current call
    running: torch.Tensor | None = None   # (batch, rank) maximum so far (KV cache)
    mask: torch.Tensor | None = None      # 2-D attention mask of the current call


@dataclass
class AttachHandle:
    """What ``attach`` returns: ``.remove()`` restores the bare model."""
    hooks: list = field(default_factory=list)
    modules: dict = field(default_factory=dict)
    states: dict = field(default_factory=dict)   # {layer: GateState}

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _gate_hook(module, gate_layer: int, state: GateState):
    def hook(layer, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("past_key_values")
        continuing = cache is not None and cache.get_seq_length(gate_layer) > 0
        valid = state.mask[:, -h.shape[1]:].bool() if state.mask is not None else None
        past = state.running if continuing and state.running is not None else None
        state.weights = causal_pool(module.weights(h), valid, past)
        state.running = state.weights[:, -1]
    return hook


def _content_hook(module, state: GateState):
    def hook(layer, args, kwargs):
        return _rewrite_first(lambda h: module(h, state.weights))(layer, args, kwargs)
    return hook


def attach_interventions(model, interventions: dict[int, nn.Module]) -> AttachHandle:
    layers = decoder_layers(model)
    handle = AttachHandle(modules=dict(interventions))
    for layer, module in interventions.items():
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range: the model has {len(layers)} layers")
        gate_layer = getattr(module, "gate_layer", None)
        if gate_layer is None:
            handle.hooks.append(layers[layer].register_forward_pre_hook(_rewrite_first(module), with_kwargs=True))
            continue
        if not 0 <= gate_layer <= layer:
            raise ValueError(f"gate layer {gate_layer} must come at or before layer {layer}")
        state = handle.states[layer] = GateState()

        def keep_mask(inner, args, kwargs, state=state):
            state.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        handle.hooks.append(_inner_model(model).register_forward_pre_hook(keep_mask, with_kwargs=True))
        handle.hooks.append(layers[gate_layer].register_forward_pre_hook(
            _gate_hook(module, gate_layer, state), with_kwargs=True))
        handle.hooks.append(layers[layer].register_forward_pre_hook(_content_hook(module, state), with_kwargs=True))
    return handle

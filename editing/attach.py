"""Attaching interventions to the decoder layers of a Hugging Face causal LM
(``architecture`` finds them in each model family).

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

from . import architecture
from .architecture import decoder_layers
from .baft import causal_pool


def _rewrite_first(fn):
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs
    return hook


@dataclass
class GateState:
    """Basis weights pooled at the gate layer, read by the content hook."""
    weights: torch.Tensor | None = None   # (batch, T, rank) for the current call
    running: torch.Tensor | None = None   # (batch, rank) maximum so far (KV cache)
    mask: torch.Tensor | None = None      # 2-D attention mask of the current call
    continuing: bool = False              # the call extends a KV cache (decoding)


@dataclass
class AttachHandle:
    """What ``attach`` returns, a context manager: leaving it (or ``.remove()``) restores
    the bare model."""
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


def _gate_hook(module, state: GateState):
    def hook(layer, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        valid = state.mask[:, -h.shape[1]:].bool() if state.mask is not None else None
        past = state.running if state.continuing and state.running is not None else None
        state.weights = causal_pool(module.weights(h), valid, past)
        state.running = state.weights[:, -1]
    return hook


def _call_hook(model, state: GateState, gate_layer: int):
    """At the decoder: each call's attention mask, and whether it continues a KV cache
    (read here, as some families pass the cache to their layers by position)."""
    def hook(inner, args, kwargs):
        state.mask, cache = architecture.decoder_call(model, args, kwargs)
        state.continuing = cache is not None and cache.get_seq_length(gate_layer) > 0
    return hook


def _content_hook(module, state: GateState):
    def hook(layer, args, kwargs):
        return _rewrite_first(lambda h: module(h, state.weights))(layer, args, kwargs)
    return hook


def attach_interventions(model, interventions: dict[int, nn.Module]) -> AttachHandle:
    """Hook ``interventions`` ({layer: module}) into ``model``; the handle is a context
    manager that removes them."""
    architecture.check(model)
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
        handle.hooks.append(architecture.decoder(model).register_forward_pre_hook(
            _call_hook(model, state, gate_layer), with_kwargs=True))
        handle.hooks.append(layers[gate_layer].register_forward_pre_hook(
            _gate_hook(module, state), with_kwargs=True))
        handle.hooks.append(layers[layer].register_forward_pre_hook(_content_hook(module, state), with_kwargs=True))
    return handle

"""Attaching interventions to named components of a Hugging Face causal LM.

An intervention at layer L rewrites the residual stream entering decoder layer L,
at every position, through a forward pre-hook (pyvene's "block_input"). Every
position is rewritten from its own hidden state only, so a plain forward, a
left-padded batch and ``generate`` with a KV cache all see the same edit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


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


@dataclass
class AttachHandle:
    """What ``attach`` returns: ``.remove()`` restores the bare model."""
    hooks: list = field(default_factory=list)
    modules: dict = field(default_factory=dict)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def attach_interventions(model, interventions: dict[int, nn.Module]) -> AttachHandle:
    layers = decoder_layers(model)
    handle = AttachHandle(modules=dict(interventions))
    for layer, module in interventions.items():
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range: the model has {len(layers)} layers")
        hook = layers[layer].register_forward_pre_hook(_rewrite_first(module), with_kwargs=True)
        handle.hooks.append(hook)
    return handle

"""The FT-L style LoRA baseline: a LoRA (peft) on the MLP output projection of the edit
layers, trained on the edit loss alone, and the hook that applies it.

A baseline to measure BaFT against: its weights are shared by all the facts of a block, so
a LoRA set cannot retract single facts nor say which edit fired. ``architecture.mlp_output``
names the projection in each model family.
"""
from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F

from . import architecture
from .attach import AttachHandle
from .config import EditConfig
from .facts import Fact
from .examples import encode, positive_items
from .trainer import TrainReport, Trunk, next_tokens, progress_bar, residual_at, seed_all


def train_lora(model, tokenizer, facts: list[Fact], config: EditConfig, progress: bool = True):
    """Train one block's LoRA on ``model`` (left as it was: peft is unloaded after).
    Returns ``({layer: {"A", "B", "scale"}}, TrainReport)``."""
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    seed_all(config.seed)
    rng = random.Random(config.seed)
    device = next(model.parameters()).device
    layers = sorted(config.layers)
    pos = encode(tokenizer, positive_items(facts, []))
    pos_h = residual_at(model, pos.ids, (layers[0],))[0]
    names = [architecture.mlp_output(model, L)[0] for L in layers]
    peft_model = get_peft_model(model, LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha,
                                                  target_modules=names, lora_dropout=0.0))
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=config.lora.lr)
    trunk = Trunk(model, layers[0])
    order = list(range(len(pos.ids)))
    bar = progress_bar(config.steps, progress, f"lora x{len(facts)}")
    loss_value, step = math.nan, 0
    try:
        for step in range(1, config.steps + 1):
            rows = torch.tensor(rng.sample(order, min(config.batch_size, len(order))))
            width = int(pos.lengths[rows].max())
            ids = pos.ids[rows, :width].to(device)
            states = trunk.states(ids, pos_h[rows, :width])
            tmask = pos.target_mask[rows, :width].to(device)
            loss = F.cross_entropy(architecture.logits(model, states[tmask]).float(), next_tokens(ids, tmask))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
            bar.set_postfix(loss=f"{loss_value:.3f}")
            bar.update(1)
        weights = {L: _trained(model.get_submodule(name)) for L, name in zip(layers, names)}   # peft wraps in place
    finally:
        bar.close()
        peft_model.unload()  # restores the bare base model in place
    return weights, TrainReport(step, time.perf_counter() - t0, loss_value, False)


def _trained(module) -> dict:
    return {"A": module.lora_A["default"].weight.detach().clone(),
            "B": module.lora_B["default"].weight.detach().clone(),
            "scale": float(module.scaling["default"])}


def merge(parts: list[dict]) -> dict:
    """sum_i s_i B_i A_i = [s_1 B_1 ... s_n B_n] [A_1; ...; A_n]: one LoRA of the summed rank."""
    return {"A": torch.cat([p["A"] for p in parts]),
            "B": torch.cat([p["scale"] * p["B"] for p in parts], dim=1), "scale": 1.0}


def attach(model, blocks: list[dict[int, dict]]) -> AttachHandle:
    """Add every block's LoRA ({layer: {"A", "B", "scale"}}) to the output of its layer's
    MLP projection; the handle (a context manager) removes them."""
    device = next(model.parameters()).device
    handle = AttachHandle()
    for lora in blocks:
        for L, lw in lora.items():
            A, B, scale = lw["A"].to(device), lw["B"].to(device), lw["scale"]

            def hook(module, args, output, A=A, B=B, scale=scale):
                x = args[0]
                return output + scale * ((x.to(A.dtype) @ A.T) @ B.T).to(output.dtype)
            handle.hooks.append(architecture.mlp_output(model, L)[1].register_forward_hook(hook))
    return handle

"""The adapter set: blocks of edits as safetensors weights beside a manifest.json.

On disk (peft style)::

    manifest.json          format version, base model id and fingerprint, method,
                           layers, per block: facts, training run, data version;
                           the sha256 of the weights file
    adapter.safetensors    blocks.<i>.layers.<L>.{R,W,b,G,c,center}  (BaFT / ReFT)
                           blocks.<i>.layers.<L>.{lora_A,lora_B} (LoRA baseline)
                           blocks.<i>.owner: the fact index of every basis

Loading never unpickles anything. A save is atomic: the directory is written
beside its destination and swapped in with a rename, so a crash leaves the old
set or the new one, never half of one.

Lifelong editing operates on the set (each returns a new set, the old one is
left as it was): ``editing.edit(..., base=set)`` trains a new block on top,
``retract`` removes the bases of single facts, ``rollback`` removes a whole block, ``consolidate``
merges every block into one. Because the blocks at a layer act as one sum of
basis terms, removing a fact's or a block's bases gives exactly the outputs of
the set that never had them.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import lora
from .attach import AttachHandle, attach_interventions
from .baft import BaFTIntervention
from .facts import Fact
from .models import fingerprint

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "adapter.safetensors"
TENSORS = ("R", "W", "b", "G", "c", "center")
QUERY_TENSORS = ("Q", "d", "qcenter")   # only in blocks trained with baft.query_gate (older sets have none)


class AdapterError(ValueError):
    """An adapter set that cannot be loaded, attached or changed as asked."""


class UnknownFactError(AdapterError):
    """A retract (or lookup) of facts the adapter set does not hold."""

    def __init__(self, fact_ids: list[str]):
        self.fact_ids = list(fact_ids)
        shown = ", ".join(self.fact_ids[:10]) + (" ..." if len(self.fact_ids) > 10 else "")
        super().__init__(f"{len(self.fact_ids)} fact(s) not in the adapter set: {shown}")


def record_of(fact: Fact) -> dict:
    """What a block remembers of each fact it edits (the manifest's ``records``)."""
    return {"fact_id": fact.fact_id, "key": fact.key, "subject": fact.subject,
            "prompt": fact.prompt, "target_new": fact.target_new,
            "rephrase_prompts": list(fact.rephrase_prompts)}


@dataclass
class Block:
    """One training run's edits: interventions per layer, or LoRA weights per layer."""
    fact_ids: list[str]
    records: list[dict] = field(default_factory=list)     # record_of(fact), in fact_ids order
    interventions: dict[int, BaFTIntervention] = field(default_factory=dict)
    lora: dict[int, dict] = field(default_factory=dict)   # {layer: {"A", "B", "scale"}}
    owner: torch.Tensor | None = None                      # fact index of each basis
    block_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    training_run: str | None = None
    data_version: str | None = None
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    stats: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.interventions or self.lora)

    @property
    def is_lora(self) -> bool:
        return bool(self.lora)

    def without(self, drop: set[int]) -> "Block | None":
        """This block less the facts at indices ``drop``; None when nothing is left."""
        if not drop:
            return self
        if len(drop) == len(self.fact_ids):
            return None
        if self.is_lora:
            raise AdapterError(f"block {self.block_id} is a LoRA block: its weights are shared by all "
                               "its facts, so single facts cannot be removed; roll back the block")
        keep_facts = [i for i in range(len(self.fact_ids)) if i not in drop]
        new_index = {old: new for new, old in enumerate(keep_facts)}
        rows = torch.tensor([k for k, o in enumerate(self.owner.tolist()) if o not in drop])
        out = Block(fact_ids=[self.fact_ids[i] for i in keep_facts],
                    records=[self.records[i] for i in keep_facts] if self.records else [],
                    owner=torch.tensor([new_index[o] for o in self.owner.tolist() if o not in drop]),
                    block_id=self.block_id, training_run=self.training_run,
                    data_version=self.data_version, created_at=self.created_at,
                    stats=dict(self.stats, removed=self.stats.get("removed", 0) + len(drop)))
        out.interventions = {L: iv.select(rows) for L, iv in self.interventions.items()}
        return out


@dataclass
class AdapterSet:
    base_model: str
    base_fingerprint: str
    method: str
    blocks: list[Block] = field(default_factory=list)
    # What the call that made this set changed (edit): added, superseded,
    # retracted fact ids and the new block's id. Not saved.
    changes: dict = field(default_factory=dict, compare=False, repr=False)

    # -- building -------------------------------------------------------------
    @classmethod
    def for_model(cls, model, method: str) -> "AdapterSet":
        return cls(base_model=str(getattr(model.config, "name_or_path", "")),
                   base_fingerprint=fingerprint(model), method=method)

    @property
    def is_lora(self) -> bool:
        """A set of the LoRA baseline: weights per layer, not bases."""
        return self.method == "lora"

    def add_block(self, block: Block) -> Block:
        self.blocks.append(block)
        return block

    @property
    def fact_ids(self) -> list[str]:
        return [f for b in self.blocks for f in b.fact_ids]

    def copy(self) -> "AdapterSet":
        return AdapterSet(self.base_model, self.base_fingerprint, self.method, list(self.blocks))

    def facts(self) -> list[Fact]:
        """The live facts, rebuilt from the blocks' records (for retention checks)."""
        return [Fact(subject=r["subject"], prompt=r["prompt"], target_new=r["target_new"],
                     fact_id=r["fact_id"], rephrase_prompts=list(r.get("rephrase_prompts") or []))
                for b in self.blocks for r in b.records]

    def locate(self, fact: Fact | str) -> list[tuple[int, int]]:
        """(block index, fact index) of every live edit of ``fact``: the same fact_id,
        or the same normalised subject and prompt."""
        fid, key = (fact, None) if isinstance(fact, str) else (fact.fact_id, fact.key)
        return [(bi, fi) for bi, b in enumerate(self.blocks)
                for fi in range(len(b.fact_ids))
                if b.fact_ids[fi] == fid or (key is not None and b.records and b.records[fi]["key"] == key)]

    # -- lifelong operations (each returns a new set) ---------------------------
    def retract(self, facts: list[Fact | str]) -> "AdapterSet":
        """This set without the edits of ``facts`` (fact ids or Facts).
        Raises UnknownFactError, changing nothing, if any of them is not live."""
        drop: dict[int, set[int]] = {}
        unknown = []
        for f in facts:
            hits = self.locate(f)
            if not hits:
                unknown.append(f if isinstance(f, str) else f.fact_id)
            for bi, fi in hits:
                drop.setdefault(bi, set()).add(fi)
        if unknown:
            raise UnknownFactError(unknown)
        out = self.copy()
        out.blocks = [nb for bi, b in enumerate(self.blocks)
                      if (nb := b.without(drop.get(bi, set()))) is not None]
        return out

    def rollback(self, block_id: str) -> "AdapterSet":
        """This set without the block ``block_id`` (a whole night's batch)."""
        if block_id not in {b.block_id for b in self.blocks}:
            raise AdapterError(f"no block {block_id!r} in this adapter set; blocks: "
                               f"{', '.join(b.block_id for b in self.blocks) or 'none'}")
        out = self.copy()
        out.blocks = [b for b in self.blocks if b.block_id != block_id]
        return out

    def consolidate(self) -> "AdapterSet":
        """One block holding every block's bases, stacked per layer. Same outputs;
        single facts can still be retracted; the merged blocks are listed in its stats."""
        if len(self.blocks) < 2:
            return self.copy()
        if len({tuple(b.layers) for b in self.blocks}) != 1:
            raise AdapterError("blocks edit different layers; consolidate sets of one layout")
        merged = Block(fact_ids=self.fact_ids, records=[r for b in self.blocks for r in b.records],
                       stats={"consolidated_from": [
                           {"block_id": b.block_id, "training_run": b.training_run,
                            "data_version": b.data_version, "facts": len(b.fact_ids)} for b in self.blocks]})
        if self.is_lora:
            merged.lora = {L: lora.merge([b.lora[L] for b in self.blocks]) for L in self.layers}
        else:
            merged.interventions = {L: BaFTIntervention.stack([b.interventions[L] for b in self.blocks])
                                    for L in self.layers}
            offsets = torch.tensor([0] + [len(b.fact_ids) for b in self.blocks]).cumsum(0)
            merged.owner = torch.cat([b.owner + offsets[i] for i, b in enumerate(self.blocks)])
        out = self.copy()
        out.blocks = [merged]
        return out

    @property
    def layers(self) -> list[int]:
        return sorted({L for b in self.blocks for L in b.layers})

    def interventions(self) -> dict[int, nn.Module]:
        """Per layer, every block's bases stacked into one module (one matmul)."""
        out = {}
        for L in self.layers:
            parts = [b.interventions[L] for b in self.blocks if L in b.interventions]
            if parts:
                out[L] = parts[0] if len(parts) == 1 else BaFTIntervention.stack(parts)
        return out

    # -- attaching ------------------------------------------------------------
    def check_base(self, model) -> None:
        found = fingerprint(model)
        if found != self.base_fingerprint:
            raise AdapterError(
                f"this adapter set was trained on base model {self.base_model!r} "
                f"(fingerprint {self.base_fingerprint}); the model given has fingerprint "
                f"{found}. Load the same base model to use it.")

    def attach(self, model, check: bool = True) -> AttachHandle:
        """Attach every block to ``model``: ``with adapter_set.attach(model): ...``
        (or ``handle.remove()``) detaches them."""
        if check:
            self.check_base(model)
        if self.is_lora:
            return lora.attach(model, [b.lora for b in self.blocks])
        device = next(model.parameters()).device
        return attach_interventions(model, {L: m.to(device) for L, m in self.interventions().items()})

    # -- saving and loading ---------------------------------------------------
    def manifest(self) -> dict:
        blocks = []
        for b in self.blocks:
            first = next(iter(b.interventions.values()), None)
            blocks.append({
                "block_id": b.block_id, "facts": b.fact_ids, "records": b.records, "layers": b.layers,
                "rank": first.rank if first is not None else None,
                "gate": first.config() if first is not None else None,
                "lora_scale": {str(L): v["scale"] for L, v in b.lora.items()} or None,
                "training_run": b.training_run, "data_version": b.data_version,
                "created_at": b.created_at, "stats": b.stats,
            })
        return {"format_version": FORMAT_VERSION, "method": self.method,
                "base_model": self.base_model, "base_fingerprint": self.base_fingerprint,
                "layers": self.layers, "positions": "all", "blocks": blocks}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, b in enumerate(self.blocks):
            for L, iv in b.interventions.items():
                for name in TENSORS + (QUERY_TENSORS if iv.query else ()):
                    out[f"blocks.{i}.layers.{L}.{name}"] = getattr(iv, name).detach().cpu().contiguous()
            for L, lw in b.lora.items():
                out[f"blocks.{i}.layers.{L}.lora_A"] = lw["A"].detach().cpu().contiguous()
                out[f"blocks.{i}.layers.{L}.lora_B"] = lw["B"].detach().cpu().contiguous()
            if b.owner is not None:
                out[f"blocks.{i}.owner"] = b.owner.to(torch.int64).cpu().contiguous()
        return out

    def save(self, directory: str | Path) -> Path:
        """Write the set to ``directory`` whole or not at all: staged beside it, fsynced,
        swapped in by rename; on any failure the staging directory is removed and what was
        at ``directory`` is left as it was. A full disk raises ``OSError(ENOSPC)`` naming
        ``directory`` (safetensors reports it as its own error type)."""
        import errno

        directory = Path(directory)
        staging = None
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
            save_file(self.tensors(), str(staging / WEIGHTS), metadata={"format": "ledit-adapter-set"})
            with open(staging / WEIGHTS, "rb") as f:
                os.fsync(f.fileno())           # safetensors does not: a power cut could empty it
            manifest = self.manifest()
            manifest["weights"] = {"file": WEIGHTS, "sha256": _sha256(staging / WEIGHTS)}
            _write_json(staging / MANIFEST, manifest)
            _swap_in(staging, directory)
        except BaseException as exc:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
                "os error 28" in str(exc) or "No space left" in str(exc)
            if full and isinstance(exc, Exception):
                raise OSError(errno.ENOSPC, f"No space left on device writing the adapter set "
                              f"{directory} (nothing there was replaced)") from exc
            raise
        fd = os.open(directory.parent, os.O_RDONLY)
        try:
            os.fsync(fd)                       # the rename itself survives a power cut
        finally:
            os.close(fd)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "AdapterSet":
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            raise AdapterError(f"{directory}: no {MANIFEST}; not an adapter set")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{path}: corrupt manifest ({exc.msg})") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise AdapterError(f"{path}: format version {manifest.get('format_version')!r} "
                               f"is not {FORMAT_VERSION}")
        weights = directory / manifest["weights"]["file"]
        if not weights.exists():
            raise AdapterError(f"{directory}: weights file {weights.name} is missing")
        digest = _sha256(weights)
        if digest != manifest["weights"]["sha256"]:
            raise AdapterError(f"{weights}: checksum mismatch (manifest {manifest['weights']['sha256']}, "
                               f"file {digest}); the adapter file is corrupted")
        tensors = load_file(str(weights))
        out = cls(manifest["base_model"], manifest["base_fingerprint"], manifest["method"])
        for i, meta in enumerate(manifest["blocks"]):
            block = Block(fact_ids=list(meta["facts"]), records=list(meta.get("records") or []),
                          block_id=meta["block_id"],
                          training_run=meta.get("training_run"), data_version=meta.get("data_version"),
                          created_at=meta.get("created_at", ""), stats=meta.get("stats") or {},
                          owner=tensors.get(f"blocks.{i}.owner"))
            for L in meta["layers"]:
                prefix = f"blocks.{i}.layers.{L}."
                if out.is_lora:
                    block.lora[L] = {"A": tensors[prefix + "lora_A"], "B": tensors[prefix + "lora_B"],
                                     "scale": float(meta["lora_scale"][str(L)])}
                else:
                    block.interventions[L] = _intervention(meta["gate"], tensors, prefix)
            out.blocks.append(block)
        return out


def _intervention(config: dict, tensors: dict[str, torch.Tensor], prefix: str) -> BaFTIntervention:
    """A saved intervention: its manifest ``gate`` config and its tensors under ``prefix``."""
    iv = BaFTIntervention.from_config(config)
    with torch.no_grad():
        for name in TENSORS + (QUERY_TENSORS if iv.query else ()):
            getattr(iv, name).copy_(tensors[prefix + name])
    return iv.requires_grad_(False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())


def _swap_in(staging: Path, directory: Path) -> None:
    """Replace ``directory`` by ``staging`` so readers see the old or the new, whole."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(directory, old)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)

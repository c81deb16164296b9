"""Scale-out: one training batch split into shards, trained in parallel through Ray.

Each shard becomes its own block, trained on top of the same production set; the
blocks then compose into one set: the production set less what the shards superseded
or retracted, then one block per shard, in shard order. Workers load the base model
themselves (``settings.model``: a name or path, which every host must resolve). Adapter
sets travel as their files' bytes (a few MB), so hosts need no shared disk and nothing
live crosses the wire: each worker gets the production set's files and the model and
edit settings (frozen dataclasses), and sends back the files of a set holding its new
block and the fact ids it removed from the production set. Both are read through
``AdapterSet.load``, which verifies the checksum.

``split_into_shards`` and ``train_shard`` are plain functions; ``sharded_training_flow``
is the Prefect flow (a ``RayTaskRunner`` per call) that ``train_shards`` runs. Ray joins
the cluster in ``RAY_ADDRESS`` if set, and starts a local one otherwise.
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from editing import AdapterError, AdapterSet, Fact, edit, load_model
from editing.baft import same_centre
from editing.config import EditConfig, ModelConfig
from editing.facts import normalise
from tasks.settings import Settings


def split_into_shards(facts: list[Fact], n: int) -> list[list[Fact]]:
    """At most ``n`` non-empty shards of about equal size, deterministic.

    Facts sharing a fact_id or a normalised subject stay in one shard, so a later
    update of a fact lands in the same block as the earlier one, and the gates of one
    subject's facts are trained against each other. Input order is kept within a shard.
    """
    parent = list(range(len(facts)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seen: dict[tuple[str, str], int] = {}
    for i, f in enumerate(facts):
        for key in (("id", f.fact_id), ("subject", normalise(f.subject or ""))):
            if not key[1]:
                continue
            if key in seen:
                parent[root(i)] = root(seen[key])
            else:
                seen[key] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(facts)):
        groups.setdefault(root(i), []).append(i)
    # Largest group first into the lightest shard (ties: first seen, lowest shard).
    shards: list[list[int]] = [[] for _ in range(max(1, n))]
    for members in sorted(groups.values(), key=lambda g: (-len(g), g[0])):
        min(shards, key=len).extend(members)
    return [[facts[i] for i in sorted(s)] for s in shards if s]


def read_files(directory: str | Path) -> dict[str, bytes]:
    """An adapter set's files as bytes, to send to another host."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def load_files(files: dict[str, bytes]) -> AdapterSet:
    """The adapter set in ``files`` (from ``read_files``), checksum verified."""
    with tempfile.TemporaryDirectory(prefix="ledit-shard-") as tmp:
        for name, data in files.items():
            if Path(name).name != name or name.startswith("."):
                raise AdapterError(f"unexpected file name in an adapter set: {name!r}")
            (Path(tmp) / name).write_bytes(data)
        return AdapterSet.load(tmp)


def train_shard(facts: list[Fact], model_config: ModelConfig, config: EditConfig,
                base: str | Path | dict | None, training_run: str | None = None,
                data_version: str | None = None, shard: str | None = None) -> dict:
    """Apply ``facts`` (upserts and retracts) on top of ``base``: the production set's
    directory or its ``read_files``, or None.

    The base model is ``model_config`` (``settings.model``), trained as ``config``
    (``settings.edit``): frozen dataclasses, pickled to the workers like the facts.
    Returns plain data that any worker can send back:
    ``files`` ({name: bytes}, an adapter set holding only the new block, or no block
    when the shard held only retracts), ``removed`` (the base set's fact ids that this
    shard superseded or retracted) and ``changes`` (``AdapterSet.changes`` of the edit).
    """
    model, tokenizer = load_model(model_config)
    if base is not None:
        base = load_files(base) if isinstance(base, dict) else AdapterSet.load(base)
    trained = edit(model, tokenizer, facts, config, base=base, progress=False,
                   training_run=training_run, data_version=data_version)
    new_id = trained.changes.get("block_id")
    new = [b for b in trained.blocks if b.block_id == new_id]
    for b in new:
        if shard:
            b.stats["shard"] = shard
    kept = {f for b in trained.blocks if b.block_id != new_id for f in b.fact_ids}
    removed = [f for f in (base.fact_ids if base else []) if f not in kept]
    one = AdapterSet(trained.base_model, trained.base_fingerprint, trained.method, new)
    with tempfile.TemporaryDirectory(prefix="ledit-shard-") as tmp:
        files = read_files(one.save(Path(tmp) / "set"))
    return {"files": files, "removed": removed, "changes": dict(trained.changes)}


def load_shard(result: dict) -> AdapterSet:
    """The set of a shard's new block, from ``train_shard``'s result (checksum verified)."""
    return load_files(result["files"])


def compose(base: AdapterSet | None, results: list[dict]) -> AdapterSet:
    """The base set less every shard's superseded and retracted facts, then each
    shard's new block in shard order. ``changes`` merges the shards' changes."""
    if not results:
        raise ValueError("no shards to compose")
    shards = [load_shard(r) for r in results]
    first = base or shards[0]
    removed = list(dict.fromkeys(f for r in results for f in r["removed"]))
    if base is None:
        out = AdapterSet(first.base_model, first.base_fingerprint, first.method)
    else:
        out = base.retract(removed) if removed else base.copy()
    for s in shards:
        if (s.base_fingerprint, s.method) != (out.base_fingerprint, out.method):
            raise AdapterError(f"a shard was trained on {s.base_model!r} ({s.base_fingerprint}, "
                               f"{s.method}), the set is for {out.base_fingerprint} ({out.method})")
        out.blocks.extend(s.blocks)
    _align_centres(out)
    out.changes = {k: [x for r in results for x in r["changes"].get(k, [])]
                   for k in ("added", "superseded", "retracted")}
    out.changes["block_ids"] = [b.block_id for s in shards for b in s.blocks]
    # One shard block is the single-batch case; with several, block_ids lists them.
    out.changes["block_id"] = out.changes["block_ids"][0] if len(out.changes["block_ids"]) == 1 else None
    return out


def _align_centres(adapter_set: AdapterSet) -> None:
    """Blocks stack only with one gate centre. Workers compute it from fixed text, but
    other thread counts or devices change its last bits: adopt the first block's."""
    for L in adapter_set.layers:
        ivs = [b.interventions[L] for b in adapter_set.blocks if L in b.interventions]
        for iv in ivs[1:]:
            if torch.equal(iv.center, ivs[0].center):
                continue
            if not same_centre(iv.center, ivs[0].center):
                raise AdapterError(f"layer {L}: blocks have different gate centres; "
                                   "were they trained with another gate layer or base model?")
            with torch.no_grad():
                iv.center.copy_(ivs[0].center)


# -- Prefect + Ray ------------------------------------------------------------------

def _resources(n_shards: int) -> dict:
    """One shard per GPU when the cluster has GPUs; else an equal part of its CPUs, and
    the worker's torch threads to match (``_flow``)."""
    import ray

    have = ray.cluster_resources() if ray.is_initialized() else {"GPU": torch.cuda.device_count()}
    if have.get("GPU"):
        return {"num_gpus": 1}
    return {"num_cpus": max(1, int(have.get("CPU", 1)) // max(1, n_shards))}


def _shard_task():
    from prefect import task

    return task(train_shard, name="train-shard", retries=1, retry_delay_seconds=10)


def _flow(facts, settings, base_dir, n_shards, training_run=None, data_version=None):
    from prefect_ray.context import remote_options

    shards = split_into_shards(facts, n_shards)
    base_files = read_files(base_dir) if base_dir else None
    base = load_files(base_files) if base_files else None       # refuses a corrupted set here
    resources = _resources(len(shards))
    # a worker with every core of a host that other shards share would wait on them
    model = replace(settings.model, threads=resources.get("num_cpus", settings.model.threads))
    with remote_options(**resources):
        futures = [_shard_task().with_options(name=f"train-shard-{i + 1}-of-{len(shards)}").submit(
            s, model, settings.edit, base_files, training_run, data_version,
            f"{i + 1}/{len(shards)}")
            for i, s in enumerate(shards)]
    # Results in submission order, whatever order the workers finish in.
    results = [f.result() for f in futures]
    return compose(base, results)


def sharded_training_flow(ray_address: str | None = None, ray_init_kwargs: dict | None = None):
    """The flow that trains shards on Ray; call it like ``train_shards`` minus the Ray options."""
    from prefect import flow
    from prefect_ray import RayTaskRunner

    runner = RayTaskRunner(address=ray_address, init_kwargs=ray_init_kwargs)
    return flow(_flow, name="sharded-training", task_runner=runner, validate_parameters=False)


def train_shards(facts: list[Fact], settings: Settings, base_dir: str | Path | None,
                 n_shards: int, training_run: str | None = None, data_version: str | None = None, *,
                 ray_address: str | None = None, ray_init_kwargs: dict | None = None) -> AdapterSet:
    """Train ``facts`` as up to ``n_shards`` blocks in parallel on top of ``base_dir``.

    Inside a running flow this is a subflow. Ray: the cluster at ``ray_address`` or
    ``RAY_ADDRESS``, the one this process already joined, or else a local one started
    for this call and shut down at its end.
    """
    base = str(base_dir) if base_dir else None
    return sharded_training_flow(ray_address, ray_init_kwargs)(
        list(facts), settings, base, n_shards, training_run, data_version)

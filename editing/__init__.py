"""The ML core: BaFT/ReFT interventions, the edit trainer, metrics, adapter sets, model loading.

Imports nothing from ``tasks`` or ``flows``. Exports load lazily, so code that only
needs the fact schema (``editing.facts``) does not pay for importing torch.
"""
from importlib import import_module

_EXPORTS = {
    "AdapterError": "adapters", "AdapterSet": "adapters", "Block": "adapters",
    "BaFTIntervention": "baft", "edit": "editor", "Fact": "facts", "FactError": "facts",
    "load_facts": "facts", "fingerprint": "models", "load_model": "models",
    "ConfigError": "config", "EditConfig": "config", "ModelConfig": "config",
    "UnsupportedModel": "architecture",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'editing' has no attribute {name!r}")

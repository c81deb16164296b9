"""The ML core: BaFT/ReFT interventions, the edit trainer, metrics, adapter sets, model loading.

Imports nothing from ``tasks`` or ``flows``.
"""
from .adapters import AdapterError, AdapterSet, Block
from .baft import BaFTIntervention
from .editor import edit
from .facts import Fact, FactError, load_facts
from .models import fingerprint, load_model
from .params import load_params

__all__ = ["AdapterError", "AdapterSet", "Block", "BaFTIntervention", "Fact", "FactError",
           "edit", "fingerprint", "load_facts", "load_model", "load_params"]

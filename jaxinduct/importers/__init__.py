"""Importers: readers that turn other libraries' saved models into canonical `Weights`.

`jaxinduct.importers.hf` reads Hugging Face model directories (``config.json`` plus
safetensors weights) of the GPT-2 and GPT-NeoX (Pythia) families, without torch and
without unpickling anything.
"""

from jaxinduct.importers.hf import HFImportError, load_hf_weights, read_hf_config, spec_from_hf_config

__all__ = ["HFImportError", "load_hf_weights", "read_hf_config", "spec_from_hf_config"]

"""Model file formats: load released checkpoints into ``lowrank.nn`` models, export them for other engines.

- ``load_official_ifairy``: a Fairy±i checkpoint (latent weights, official ``ComplexNetLM`` layout) into
  ``IFairyForCausalLM``, PhaseQuant at load;
- ``export_ifairy_gguf`` / ``read_ifairy_gguf`` / ``load_ifairy_gguf``: GGUF for ifairy.cpp, linears in its
  IFAIRY block type, and back.
"""
from .ifairy_gguf import (IFAIRY_TYPE, export_ifairy_gguf, ifairy_blocks, ifairy_codes_from_blocks,
                          load_ifairy_gguf, read_ifairy_gguf)
from .ifairy_official import load_official_ifairy, official_ifairy_layout

__all__ = ["load_official_ifairy", "official_ifairy_layout", "export_ifairy_gguf", "read_ifairy_gguf",
           "load_ifairy_gguf", "ifairy_blocks", "ifairy_codes_from_blocks", "IFAIRY_TYPE"]

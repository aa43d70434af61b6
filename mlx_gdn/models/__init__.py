"""Model stacks: Gated DeltaNet and its attention hybrids."""

from .cache import AttentionCache, GatedDeltaNetCache, Mamba2Cache
from .gated_deltanet import PRESETS, Model, ModelArgs, from_preset

__all__ = ["Model", "ModelArgs", "PRESETS", "from_preset", "AttentionCache", "GatedDeltaNetCache",
           "Mamba2Cache"]

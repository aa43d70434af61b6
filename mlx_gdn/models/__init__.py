"""Model stacks: Gated DeltaNet and its attention / Mamba2 hybrids; saving, loading, quantizing."""

from .cache import AttentionCache, GatedDeltaNetCache, Mamba2Cache
from .gated_deltanet import PRESETS, Model, ModelArgs, from_preset
from .io import load_model, quantize_model, save_model

__all__ = ["Model", "ModelArgs", "PRESETS", "from_preset", "load_model", "save_model",
           "quantize_model", "AttentionCache", "GatedDeltaNetCache", "Mamba2Cache"]

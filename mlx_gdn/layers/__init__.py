"""Layers: fla's Gated DeltaNet, softmax attention with RoPE / GQA / sliding window, Mamba2, SwiGLU."""

from .attention import Attention
from .gated_deltanet import GatedDeltaNet
from .mamba2 import Mamba2
from .mlp import SwiGLU

__all__ = ["Attention", "GatedDeltaNet", "Mamba2", "SwiGLU"]

"""Layers: fla's Gated DeltaNet, softmax attention with RoPE / GQA / sliding window, SwiGLU MLP."""

from .attention import Attention
from .gated_deltanet import GatedDeltaNet
from .mlp import SwiGLU

__all__ = ["Attention", "GatedDeltaNet", "SwiGLU"]

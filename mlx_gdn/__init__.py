"""mlx_gdn: Gated DeltaNet (Yang, Kautz, Hatamizadeh, arXiv 2412.06464) for MLX."""

from .generate import generate, generate_batch, stream_generate  # mlx_gdn.generate: the function
from .loading import load
from .ops import gated_delta_rule

__version__ = "0.1.0"
__all__ = ["gated_delta_rule", "load", "generate", "generate_batch", "stream_generate"]

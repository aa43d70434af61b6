"""The gated delta rule: `gated_delta_rule` (fla's interface), its recurrent reference and chunked path."""

from .chunk import chunk_backward, chunk_forward, invert_unit_lower
from .gated_delta import gate_from_parameters, gated_delta_rule, l2_normalize
from .recurrent import recurrent_gated_delta

__all__ = ["gated_delta_rule", "recurrent_gated_delta", "chunk_forward", "chunk_backward",
           "invert_unit_lower", "gate_from_parameters", "l2_normalize"]

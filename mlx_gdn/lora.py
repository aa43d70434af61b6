"""LoRA adapters through mlx-lm's LoRALinear: apply, save beside a model, load, fuse.

A model directory with adapters holds the base weights (model.safetensors, under the base names) plus
adapters.safetensors and adapter_config.json; `load_model` rebuilds the adapters, `fuse` merges them
(W + scale * B^T A^T per projection) into plain Linear layers.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_KEYS = ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")


@dataclass
class LoraConfig:
    rank: int
    alpha: float = 16.0
    layers: int = -1  # the last `layers` blocks; -1: all
    keys: tuple = DEFAULT_KEYS  # projection names inside a block's mixer / MLP

    @property
    def scale(self):
        return self.alpha / self.rank


def apply_lora(model, config: LoraConfig):
    """Freezes the model and wraps the chosen projections in LoRALinear (only those train)."""
    if config.rank < 1:
        raise ValueError(f"LoRA: rank must be at least 1, got {config.rank}")
    blocks = model.model.layers
    chosen = blocks if config.layers < 0 else blocks[max(len(blocks) - config.layers, 0):]
    model.freeze()
    found = 0
    for block in chosen:
        wrapped = [(name, LoRALinear.from_base(m, r=config.rank, scale=config.scale))
                   for name, m in block.named_modules()
                   if isinstance(m, nn.Linear) and name.split(".")[-1] in config.keys]
        found += len(wrapped)
        block.update_modules(tree_unflatten(wrapped))
    if not found:
        raise ValueError(f"LoRA: no projection named {list(config.keys)} in the chosen blocks")
    model.lora = config
    return model


def split_weights(model):
    """(base weights under the names of the plain model, adapter weights) of a LoRA model."""
    base, adapters = {}, {}
    for name, value in tree_flatten(model.parameters()):
        if name.endswith((".lora_a", ".lora_b")):
            adapters[name] = value
        else:
            base[name.replace(".linear.", ".")] = value
    return base, adapters


def save_adapters(model, path: Path):
    _, adapters = split_weights(model)
    mx.save_safetensors(str(path / ADAPTERS), adapters)
    (path / ADAPTER_CONFIG).write_text(json.dumps(asdict(model.lora), indent=1))


def load_adapters(model, path: Path):
    """Rebuilds the adapters recorded in path (if any) on a model holding the base weights."""
    if not (path / ADAPTER_CONFIG).is_file():
        return model
    raw = json.loads((path / ADAPTER_CONFIG).read_text())
    apply_lora(model, LoraConfig(**dict(raw, keys=tuple(raw.get("keys", DEFAULT_KEYS)))))
    model.load_weights(list(mx.load(str(path / ADAPTERS)).items()), strict=False)
    return model


def fuse(model, dequantize=False):
    """Merges every adapter into its projection; the model becomes a plain one (a quantized base
    stays quantized unless dequantize)."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules()
             if isinstance(m, LoRALinear)]
    model.update_modules(tree_unflatten(fused))
    model.lora = None
    return model

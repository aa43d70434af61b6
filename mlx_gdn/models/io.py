"""Saving, loading and quantizing models: a directory of config.json + model.safetensors (+ tokenizer)."""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .gated_deltanet import Model, ModelArgs

WEIGHTS = "model.safetensors"


def _quantizable(group_size):
    # Linear / Embedding layers whose input width splits into groups; small gate projections stay float
    return lambda path, module: (hasattr(module, "to_quantized")
                                 and module.weight.shape[-1] % group_size == 0)


def quantize_model(model: Model, bits: int = 4, group_size: int = 64) -> dict:
    """Quantizes in place (mlx.nn.quantize); returns the config entry that reproduces it."""
    if bits not in (4, 8):
        raise ValueError(f"quantization: bits must be 4 or 8, got {bits}")
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=_quantizable(group_size))
    model.args.quantization = {"bits": bits, "group_size": group_size}
    return model.args.quantization


def save_model(model: Model, path, extra_files=()):
    """Writes config.json and model.safetensors into `path` via a temporary directory, renamed at the end."""
    path = Path(path)
    config = {k: v for k, v in dataclasses.asdict(model.args).items() if k != "extra"}
    config.update(model.args.extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        mx.save_safetensors(str(tmp / WEIGHTS), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})
        for f in extra_files:
            shutil.copy(f, tmp / Path(f).name)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(path) -> Model:
    """Builds the model from config.json and loads model.safetensors (quantized if the config says so)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / 'config.json'}: not valid JSON ({err})") from None
    model = Model(ModelArgs.from_dict(config))
    if model.args.quantization:
        quantize_model(model, **model.args.quantization)
    weights_file = path / WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS}")
    try:
        weights = mx.load(str(weights_file))
    except Exception as err:
        raise ValueError(f"{weights_file}: cannot read it as safetensors ({err})") from None
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        raise ValueError(f"{weights_file}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unknown keys {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise ValueError(f"{weights_file}: {name} has shape {tuple(value.shape)}, "
                             f"expected {tuple(expected[name].shape)}")
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model

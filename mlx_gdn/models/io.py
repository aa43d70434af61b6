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
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10 ** 9  # as Hugging Face's save_pretrained: larger weights go into shards


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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: one message naming the file and the problem."""


def config_of(model: Model) -> dict:
    config = {k: v for k, v in dataclasses.asdict(model.args).items() if k != "extra"}
    config.update(model.args.extra)
    return config


def _split(parts, max_bytes):
    """Each dict of tensors as shards of at most max_bytes (a larger tensor alone), in order. Dicts are
    never merged (a converted checkpoint streams one source shard at a time, and memory follows it)."""
    for tensors in parts:
        shard, size = {}, 0
        for name in list(tensors):
            value = tensors.pop(name)
            if shard and size + value.nbytes > max_bytes:
                yield shard
                shard, size = {}, 0
            shard[name] = value
            size += value.nbytes
        if shard:
            yield shard


def write_model_dir(path, config: dict, parts, extra_files=()):
    """Writes config.json, the weights and extra files through a temporary directory renamed at the
    end. `parts` yields dicts of tensors (a source checkpoint's shards), written and released one at a
    time, each split further where it exceeds MAX_SHARD_BYTES: one model.safetensors, or shards
    model-0000i-of-0000n.safetensors with an index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        names = []  # the tensor names of each shard, written under a provisional name
        for i, tensors in enumerate(_split(parts, MAX_SHARD_BYTES)):
            mx.save_safetensors(str(tmp / f"part-{i}.safetensors"), tensors, metadata={"format": "mlx"})
            names.append(list(tensors))
            del tensors
        n = len(names)
        weight_map = {}
        for i, keys in enumerate(names):
            name = WEIGHTS if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / f"part-{i}.safetensors", tmp / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            (tmp / INDEX).write_text(json.dumps({"weight_map": weight_map}, indent=1))
        for f in extra_files:
            shutil.copy(f, tmp / Path(f).name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's directory is private (0700); the output is not
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model: Model, path, extra_files=()):
    """Writes config.json and model.safetensors into `path` via a temporary directory (a LoRA model:
    the base weights, plus adapters.safetensors and adapter_config.json)."""
    from .. import lora
    if getattr(model, "lora", None) is None:
        write_model_dir(path, config_of(model), [dict(tree_flatten(model.parameters()))], extra_files)
        return
    base, _ = lora.split_weights(model)
    with tempfile.TemporaryDirectory() as tmp:
        lora.save_adapters(model, Path(tmp))
        files = [Path(tmp) / lora.ADAPTERS, Path(tmp) / lora.ADAPTER_CONFIG]
        write_model_dir(path, config_of(model), [base], list(extra_files) + files)


def _load_safetensors(file: Path) -> dict:
    try:
        return mx.load(str(file))
    except Exception as err:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors ({err})") from None


def read_safetensors_dir(path: Path):
    """The tensors of model.safetensors, or of each shard named by model.safetensors.index.json, as a
    list of dicts (one per file), or None when the directory has neither."""
    index = path / INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard {missing[0]} is missing")
        return [_load_safetensors(path / s) for s in shards]
    if (path / WEIGHTS).is_file():
        return [_load_safetensors(path / WEIGHTS)]
    return None


def check_weights(weights: dict, model: Model, source):
    """Names and shapes of `weights` against the model's parameters."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    more = lambda names: " ..." if len(names) > 5 else ""
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {unknown[:5]}{more(unknown)}")
    if missing:
        raise CheckpointError(f"{source}: missing keys {missing[:5]}{more(missing)}")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, expected "
                                  f"{tuple(expected[name].shape)}")


def load_model(path) -> Model:
    """Builds the model from config.json and loads its weights (quantized if the config says so)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({err})") from None
    model = Model(ModelArgs.from_dict(config))
    if model.args.quantization:
        quantize_model(model, **model.args.quantization)
    shards = read_safetensors_dir(path)
    if shards is None:
        raise FileNotFoundError(f"{path}: no {WEIGHTS} or {INDEX}")
    weights = {k: v for shard in shards for k, v in shard.items()}
    check_weights(weights, model, path)
    model.load_weights(list(weights.items()))
    from ..lora import load_adapters
    load_adapters(model, path)
    mx.eval(model.parameters())
    return model

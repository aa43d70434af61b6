"""Checkpoint conversion: fla Hugging Face checkpoints and NVlabs .pth -> mlx_gdn, and back (`to_hf`).

Reads fla's `gated_deltanet` layout (config.json + model.safetensors, sharded safetensors with an
index, or pytorch_model.bin through torch.load(weights_only=True)) and NVlabs lit_gpt training
checkpoints (.pth, weights_only too); fla's renaming lives in `sanitize`, NVlabs' in
`mlx_gdn.nvlabs.sanitize`. Output is written to a temporary directory and renamed at the end.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import nvlabs
from .lora import fuse
from .loading import resolve
from .models import Model, ModelArgs, load_model, quantize_model, save_model
from .models.io import CheckpointError, check_weights, config_of, read_safetensors_dir, write_model_dir

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


ConversionError = CheckpointError  # bad input to a conversion: one message naming file and problem


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ConversionError(f"{path}: no config.json (empty directory or not a checkpoint)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{file}: not valid JSON ({err})") from None
    if config.get("model_type") != "gated_deltanet":
        raise ConversionError(f"{file}: unsupported model_type {config.get('model_type')!r} "
                              "(expected 'gated_deltanet')")
    return config


def read_weights(path: Path):
    """A checkpoint directory's tensors as a list of dicts, one per file (safetensors lazily)."""
    shards = read_safetensors_dir(path)
    if shards is not None:
        return shards
    if (path / "pytorch_model.bin").is_file():
        return [_load_torch(path / "pytorch_model.bin")]
    raise ConversionError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin")


def _load_torch(file: Path, unwrap=lambda state, source: state) -> dict:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{file}: reading .bin/.pth files needs torch "
                              "(pip install 'mlx_gdn[convert]')") from None
    try:
        state = unwrap(torch.load(str(file), map_location="cpu", weights_only=True), file)
    except ConversionError:
        raise
    except Exception as err:  # a pickle that needs code is refused by weights_only
        raise ConversionError(f"{file}: refused or unreadable ({type(err).__name__}: {err})") from None
    return {k: mx.array(v.float().numpy()).astype(_torch_dtype(v)) for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def _torch_dtype(tensor):
    return {"torch.bfloat16": mx.bfloat16, "torch.float16": mx.float16}.get(str(tensor.dtype), mx.float32)


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """fla's keys are ours; drop what fla keeps but does not use (attn.D of older checkpoints, a tied
    lm_head)."""
    out = {k: v for k, v in weights.items() if not k.endswith(".attn.D")}
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _claim(out: Path, force: bool):
    if out.exists() and not force:
        raise ConversionError(f"{out} exists (use --force to replace it)")


def _read_checkpoint(hf_path, nvlabs_config, tokenizer):
    """(source, args, shards of our weights, files to carry) of an fla directory / hub id or an
    NVlabs .pth training checkpoint."""
    if Path(hf_path).suffix in (".pth", ".pt", ".ckpt"):
        src = Path(hf_path)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such checkpoint file")
        state = _load_torch(src, nvlabs.state_dict)
        args = nvlabs.model_args(state, nvlabs_config, src)
        extra = []
        if tokenizer:
            extra = [Path(tokenizer)] if Path(tokenizer).is_file() else \
                [Path(tokenizer) / f for f in TOKENIZER_FILES if (Path(tokenizer) / f).is_file()]
            if not extra:
                raise FileNotFoundError(f"{tokenizer}: no tokenizer file")
        return src, args, [nvlabs.sanitize(state, args)], extra
    src = resolve(hf_path)
    args = ModelArgs.from_dict(read_config(src))
    extra = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    return src, args, [sanitize(shard, args) for shard in read_weights(src)], extra


def convert(hf_path, mlx_path, dtype=None, quantize=False, q_bits=4, q_group_size=64, force=False,
            nvlabs_config=None, tokenizer=None):
    """fla checkpoint (directory or hub id) or NVlabs .pth -> mlx_gdn directory. Returns the output
    path. nvlabs_config: a published config name or a config.json (default: inferred); tokenizer:
    a tokenizer file or directory to carry (a .pth has none).

    Without quantization, tensors go through shard by shard (each read, cast and written, then
    released), so memory stays near one shard; quantizing builds the whole model."""
    out = Path(mlx_path)
    _claim(out, force)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    src, args, shards, extra = _read_checkpoint(hf_path, nvlabs_config, tokenizer)
    model = Model(args)  # parameters stay lazy: the random init is never computed
    check_weights({k: v for shard in shards for k, v in shard.items()}, model, src)
    # A_log and dt_bias stay float32 (fla keeps the gate in float32; bf16 can round A to 0)
    cast = lambda k, v: v if dtype is None or k.endswith(("A_log", "dt_bias")) else v.astype(DTYPES[dtype])
    if quantize:
        model.load_weights([(k, cast(k, v)) for shard in shards for k, v in shard.items()])
        quantize_model(model, bits=q_bits, group_size=q_group_size)
        save_model(model, out, extra_files=extra)
        return out

    def stream():
        while shards:
            shard = shards.pop(0)
            yield {k: cast(k, v) for k, v in shard.items()}

    write_model_dir(out, config_of(model), stream(), extra_files=extra)
    return out


def fla_config(args: ModelArgs) -> dict:
    """Our config as fla's GatedDeltaNetConfig fields (hybrid layers as its `attn` spec)."""
    config = dict(args.extra)
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "num_heads", "num_v_heads",
              "expand_v", "conv_size", "use_gate", "use_short_conv", "allow_neg_eigval", "hidden_ratio",
              "intermediate_size", "norm_eps", "tie_word_embeddings")
    values = dataclasses.asdict(args)
    config.update({f: values[f] for f in fields}, model_type="gated_deltanet")
    config.setdefault("architectures", ["GatedDeltaNetForCausalLM"])
    kinds = set(args.layer_types) - {"gdn"}
    if "mamba2" in kinds:
        raise ConversionError("--to-hf: fla has no Mamba2 layers (H2 models stay in MLX)")
    if kinds:
        attn = [i for i, t in enumerate(args.layer_types) if t != "gdn"]
        if kinds == {"swa", "attn"}:
            raise ConversionError("--to-hf: fla's attn spec takes one window for all attention layers")
        config["attn"] = {"layers": attn, "num_heads": args.attn_num_heads or args.num_heads,
                          "num_kv_heads": args.attn_num_kv_heads or args.attn_num_heads or args.num_heads,
                          "qkv_bias": args.attn_qkv_bias, "rope_theta": args.rope_theta,
                          "window_size": args.window_size if kinds == {"swa"} else None}
    else:
        config["attn"] = None
    return config


def to_hf(mlx_path, hf_path, dtype="float32", force=False):
    """mlx_gdn directory -> fla checkpoint (config.json + model.safetensors), de-quantized, LoRA
    adapters fused."""
    out = Path(hf_path)
    _claim(out, force)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    src = Path(mlx_path)
    model = load_model(src)
    if model.args.b_proj_bias:
        raise ConversionError(f"--to-hf: {src} has a b_proj bias (an NVlabs model); fla's layer has none")
    if getattr(model, "lora", None) is not None:
        fuse(model, dequantize=True)
    weights = {}
    for name, module in model.named_modules():  # de-quantize
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[f"{name}.weight"] = mx.dequantize(module.weight, module.scales, module.biases,
                                                      module.group_size, module.bits)
    for name, value in tree_flatten(model.parameters()):
        if not name.endswith((".scales", ".biases")) and name not in weights:
            weights[name] = value
    weights = {k: v if k.endswith(("A_log", "dt_bias")) else v.astype(DTYPES[dtype])
               for k, v in weights.items()}
    config = fla_config(model.args)
    config["dtype"] = dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy(src / f, tmp / f)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
